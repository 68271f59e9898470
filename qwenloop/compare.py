"""``qwenloop compare RUN_DIR RUN_DIR ...``: the same job run under several backends, side by side.

    qwenloop compare out-zero3 out-fsdp                  # prints the table, writes ./compare.md and ./compare.png
    qwenloop compare out-single out-ddp --out reports/   # elsewhere
    qwenloop compare out-a out-b --force                 # runs of different jobs: compared anyway, differences listed

The first run is the reference. The table: backend, precision, world size, batch split, tokens/s, peak memory per
rank, time, final and best eval loss, the largest per-step train-loss difference from the reference, and the
relative L2 distance of each adapter from the reference's (they agree within ``ADAPTER_TOL``). The PNG overlays
the runs' loss curves and plots each one's difference from the reference. Runs whose training configs differ in
anything but where they were written and how they were launched are refused unless ``--force``: the comparison
says which backend is faster or leaner only when they trained the same thing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

from .config import flatten_config
from .errors import CommandParser, UserError
from .report import INSTALL_HINT, write_file_atomic
from .runlog import RunLog, finite, load_run

__all__ = ["RunRow", "ComparisonResult", "compare_runs", "config_differences", "adapter_distance", "main"]

# Adapters "agree" when ||a - ref|| / ||ref|| over all their tensors is at most this. fp32: runs of one job on
# different backends differ by summation order only (1e-5 measured on CPU, tests/test_distributed.py); 1e-3 leaves
# room for GPU kernels and stays far below a real difference (a lost rank or a wrong scaling moves every update
# by ~2x). 16-bit: DeepSpeed and autocast round differently; 5e-2 is the bound tests/test_parity_bf16.py explains.
ADAPTER_TOL = {"fp32": 1e-3, "16-bit": 5e-2}

# Training-config keys that say where a run was written, how it was watched or how it was kept, not what it
# trained: they may differ between runs of the same job.
NOT_THE_JOB = ("output_dir", "overwrite_output_dir", "resume_from", "force_resume", "report_to", "num_workers",
               "log_every_steps", "checkpoint_every_steps", "keep_last_checkpoints", "peak_tflops")
# How the global batch is split over processes follows from the process count (the accelerate side): 4 x 2
# accumulation on one GPU is the job 2 x 2 x 2 is on two. Only the product has to match.
BATCH_SPLIT = ("micro_batch_size", "gradient_accumulation_steps")


@dataclass
class RunRow:
    directory: str
    label: str
    backend: str
    precision: str
    world_size: int
    batch: tuple[int, int, int] | None  # micro, accumulation, processes
    tokens_per_s: float | None
    target_tokens_per_s: float | None
    memory_gib_per_rank: list[float]
    memory_kind: str
    seconds: float | None
    seconds_kind: str  # "wall" or "training steps"
    final_eval_loss: float | None
    best_eval_loss: float | None
    max_loss_diff: float | None  # max over common steps of |loss - reference loss|; None for the reference
    steps_compared: int
    adapter_distance: float | None  # relative L2 from the reference's adapter; None for the reference or when unusable
    adapter_note: str = ""  # why there is no distance (no adapter, other tensors)
    adapter_tol: float = 0.0
    is_reference: bool = False

    @property
    def adapters_agree(self) -> bool | None:
        return None if self.adapter_distance is None else self.adapter_distance <= self.adapter_tol


@dataclass
class ComparisonResult:
    rows: list[RunRow]
    differences: dict[str, list] = field(default_factory=dict)  # config key -> value in each run (forced only)
    markdown: str = ""
    table_path: str | None = None
    figure_path: str | None = None
    figure: object = field(default=None, repr=False)  # the matplotlib Figure (None without matplotlib)


def compare_runs(dirs, force: bool = False, out: str | None = None, adapter_tol: float | None = None) -> ComparisonResult:
    """Compare finished runs (the first is the reference). With ``out`` (a directory), write ``compare.md`` and,
    when matplotlib is installed, ``compare.png`` there; nothing is written before every run has been read and
    checked. Refuses runs of different training configs unless ``force`` (the differences are then listed)."""
    dirs = [os.fspath(d) for d in dirs]
    if len(dirs) < 2:
        raise UserError(f"qwenloop compare: {len(dirs)} run director{'y' if len(dirs) == 1 else 'ies'} given; "
                        f"compare needs at least two (the first is the reference)")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: not a directory; --out takes the directory to write compare.md and compare.png to")
    if adapter_tol is not None and not (finite(adapter_tol) and adapter_tol >= 0):
        raise UserError(f"qwenloop compare: --adapter-tol {adapter_tol}: must be a finite number >= 0, e.g. 1e-3")
    runs = [load_run(d, need_info=True, need_config=not force) for d in dirs]
    differences = config_differences(runs)
    if differences and not force:
        listed = "; ".join(f"{k}: " + ", ".join(f"{v!r} in {r.name}" for v, r in zip(vals, runs)) for k, vals in differences.items())
        raise UserError(f"qwenloop compare: the runs trained different jobs: their config.yaml differ in {listed}; "
                        f"compare runs of one config under different accelerate configs, or pass --force")
    labels = _labels(runs)
    rows = [_row(run, runs[0], label, adapter_tol) for run, label in zip(runs, labels)]
    result = ComparisonResult(rows, differences)
    result.markdown = table_markdown(rows, differences)
    result.figure = _figure_or_none(runs, labels)
    if out is not None:
        _write(result, out)
    return result


# ---- what is compared ----------------------------------------------------------------------------------------


def config_differences(runs: list[RunLog]) -> dict[str, list]:
    """Training-config keys whose value differs from the reference's in some run -> the value in every run
    (``None`` where a run lacks the key or its config.yaml). The batch split counts as one key, its product."""
    flats = [flatten_config(r.config) if r.config else {} for r in runs]
    keys = sorted(set().union(*flats) - set(NOT_THE_JOB) - set(BATCH_SPLIT))
    differences = {k: [f.get(k) for f in flats] for k in keys if any(f.get(k) != flats[0].get(k) for f in flats)}
    batches = [r.global_batch() for r in runs]
    products = [math.prod(b) if b else None for b in batches]
    if any(p != products[0] for p in products):
        differences["global batch (micro_batch_size x gradient_accumulation_steps x processes)"] = [
            f"{b[0]}x{b[1]}x{b[2]}={math.prod(b)}" if b else None for b in batches]
    return differences


def max_loss_difference(run: RunLog, reference: RunLog) -> tuple[float | None, int]:
    """The largest |train loss - reference train loss| over the steps both logged with a finite loss, and how
    many steps that is."""
    mine, ref = run.losses_by_step(), reference.losses_by_step()
    common = [s for s in mine if s in ref and finite(mine[s]) and finite(ref[s])]
    if not common:
        return None, 0
    return max(abs(mine[s] - ref[s]) for s in common), len(common)


def adapter_distance(adapter_dir: str, reference_dir: str) -> tuple[float | None, str]:
    """||a - ref|| / ||ref|| over every tensor of two saved adapters (fp64 sums), or None and why not."""
    import torch
    from safetensors.torch import load_file

    paths = [os.path.join(d, "adapter_model.safetensors") for d in (adapter_dir, reference_dir)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        return None, f"no adapter ({missing[0]} not found)"
    a, ref = (load_file(p) for p in paths)
    if a.keys() != ref.keys() or any(a[k].shape != ref[k].shape for k in a):
        return None, "other tensors (names or shapes differ from the reference's)"
    diff = sum(float(torch.sum((a[k].double() - ref[k].double()) ** 2)) for k in a)
    norm = sum(float(torch.sum(ref[k].double() ** 2)) for k in ref)
    if norm == 0:
        return (0.0, "") if diff == 0 else (math.inf, "")
    return math.sqrt(diff / norm), ""


def _tolerance(run: RunLog, reference: RunLog) -> float:
    both_fp32 = run.precision == "fp32" and reference.precision == "fp32"
    return ADAPTER_TOL["fp32" if both_fp32 else "16-bit"]


def _labels(runs: list[RunLog]) -> list[str]:
    names = [r.name for r in runs]
    # Two runs called "run" in different parents: the paths as given tell them apart.
    return names if len(set(names)) == len(names) else [r.directory for r in runs]


def _row(run: RunLog, reference: RunLog, label: str, adapter_tol: float | None) -> RunRow:
    final, best = run.final_eval(), run.best_eval()
    memory, memory_kind = run.memory_per_rank()
    seconds, seconds_kind = run.seconds()
    row = RunRow(
        directory=run.directory, label=label, backend=str(run.get("backend")), precision=run.precision,
        world_size=run.get("world_size"), batch=run.global_batch(), tokens_per_s=run.get("tokens_per_s"),
        target_tokens_per_s=run.get("target_tokens_per_s"), memory_gib_per_rank=memory, memory_kind=memory_kind,
        seconds=seconds, seconds_kind=seconds_kind, final_eval_loss=final["eval_loss"] if final else None,
        best_eval_loss=best["eval_loss"] if best else None, max_loss_diff=None, steps_compared=0,
        adapter_distance=None, adapter_tol=adapter_tol if adapter_tol is not None else _tolerance(run, reference),
        is_reference=run is reference)
    if run is not reference:
        row.max_loss_diff, row.steps_compared = max_loss_difference(run, reference)
        row.adapter_distance, row.adapter_note = adapter_distance(os.path.join(run.directory, "adapter"),
                                                                  os.path.join(reference.directory, "adapter"))
    return row


# ---- the table -----------------------------------------------------------------------------------------------


def _num(value, fmt: str) -> str:
    return format(value, fmt) if finite(value) else "-"


def _time_header(rows: list[RunRow]) -> str:
    kinds = {r.seconds_kind for r in rows}
    return {frozenset({"wall"}): "wall time (s)", frozenset({"training steps"}): "time (s, training steps)"}.get(
        frozenset(kinds), "time (s)")


def _cells(row: RunRow, mixed_time: bool) -> list[str]:
    memory = ", ".join(f"{g:.2f}" for g in row.memory_gib_per_rank) or "-"
    seconds = _num(row.seconds, ".1f") + (f" ({row.seconds_kind})" if mixed_time and row.seconds is not None else "")
    if row.is_reference:
        loss_diff, adapter = "(reference)", "(reference)"
    else:
        loss_diff = f"{_num(row.max_loss_diff, '.2e')} ({row.steps_compared} steps)"
        adapter = row.adapter_note or (f"{row.adapter_distance:.2e} ({'agree' if row.adapters_agree else 'differ'}, "
                                       f"tol {row.adapter_tol:.0e})")
    batch = "x".join(map(str, row.batch)) if row.batch else "-"
    return [f"`{row.label}`", row.backend, row.precision, str(row.world_size), batch, _num(row.tokens_per_s, ",.0f"),
            _num(row.target_tokens_per_s, ",.0f"), f"{memory} ({row.memory_kind})", seconds,
            _num(row.final_eval_loss, ".4f"), _num(row.best_eval_loss, ".4f"), loss_diff, adapter]


def table_markdown(rows: list[RunRow], differences: dict[str, list] | None = None) -> str:
    """The comparison as Markdown: a header naming the reference (and, when forced, how the configs differ)
    and one row per run."""
    ref = rows[0].label
    lines = [f"# qwenloop compare: {len(rows)} runs, reference `{ref}`", ""]
    if differences:
        lines += ["**Forced: these are not runs of one training config.** They differ in:", ""]
        lines += [f"- `{k}`: " + ", ".join(f"{v!r} (`{r.label}`)" for v, r in zip(vals, rows)) for k, vals in differences.items()]
        lines.append("")
    header = ["run", "backend", "precision", "world size", "batch (micro x accum x ranks)", "tokens/s", "target tokens/s",
              "peak memory per rank (GiB)", _time_header(rows), "final eval loss", "best eval loss",
              f"max abs train-loss diff vs `{ref}`", f"adapter rel. L2 vs `{ref}`"]
    mixed = len({r.seconds_kind for r in rows}) > 1
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(r, mixed)) + " |" for r in rows]
    lines += ["", "Throughput: the run's mean over its training steps (run.json). Loss difference: over the steps both "
              "runs logged. Adapters agree when ||a - ref|| / ||ref|| over all tensors is within the tolerance (1e-3 "
              "fp32, 5e-2 when either run is 16-bit)."]
    return "\n".join(lines) + "\n"


# ---- the figure ----------------------------------------------------------------------------------------------


def _figure_or_none(runs: list[RunLog], labels: list[str]):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return comparison_figure(runs, labels, Figure)


def comparison_figure(runs: list[RunLog], labels: list[str], Figure=None):
    """Two panels: every run's train loss (and eval loss, dots) overlaid; each run's train loss minus the
    reference's, per common step. Returned unsaved so that its axes can be checked."""
    if Figure is None:
        from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.2), layout="constrained")
    curves, diffs = fig.subplots(1, 2)
    ref = runs[0].losses_by_step()
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = f"C{i}"
        losses = run.losses_by_step()
        steps = [s for s in losses if finite(losses[s])]
        curves.plot(steps, [losses[s] for s in steps], color=color, label=f"{label} ({run.get('backend')}, "
                    f"{run.precision}, {run.get('world_size')} rank{'s' if run.get('world_size') != 1 else ''})", linestyle="-" if i == 0 else "--")
        evals = [(m["step"], m["eval_loss"]) for m in run.evals]
        if evals:
            curves.plot(*zip(*evals), color=color, marker="o", linestyle="none", label=f"{label} eval")
        if i:
            common = [s for s in steps if s in ref and finite(ref[s])]
            diffs.plot(common, [losses[s] - ref[s] for s in common], color=color, marker=".", label=label)
    diffs.axhline(0.0, color="gray", linewidth=1)
    curves.set_title("train loss (dots: eval loss)")
    curves.set_ylabel("loss per target token")
    diffs.set_title(f"train loss minus {labels[0]}'s")
    diffs.set_ylabel("loss difference")
    for ax in (curves, diffs):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _write(result: ComparisonResult, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    result.table_path = os.path.join(out, "compare.md")
    text = result.markdown
    if result.figure is not None:
        import io

        buf = io.BytesIO()
        result.figure.savefig(buf, format="png", dpi=100)
        result.figure_path = os.path.join(out, "compare.png")
        write_file_atomic(result.figure_path, buf.getvalue())
        text += "\n![loss curves](compare.png)\n"
    write_file_atomic(result.table_path, text)


# ---- command line --------------------------------------------------------------------------------------------



def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="qwenloop compare", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="finished runs' output_dirs; the first is the reference")
    p.add_argument("--out", default=".", help="directory for compare.md and compare.png (default: the current one)")
    p.add_argument("--force", action="store_true", help="compare runs whose training configs differ (listed in the table)")
    p.add_argument("--adapter-tol", type=float, help="relative L2 distance under which adapters agree "
                   "(default 1e-3 for fp32 runs, 5e-2 when either is 16-bit)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    result = compare_runs(args.run_dirs, force=args.force, out=args.out, adapter_tol=args.adapter_tol)
    print(result.markdown, end="")
    if result.figure is None:
        print(f"compare.png not written: matplotlib is not installed ({INSTALL_HINT})", file=sys.stderr)
    print(f"written: {', '.join(p for p in (result.table_path, result.figure_path) if p)}", file=sys.stderr)
    return 0
