"""``qwenloop plot RUN_DIR``: a run's curves (``curves.png``) and its one-page summary (``report.md``).

    qwenloop plot outputs/demo                 # writes outputs/demo/curves.png and outputs/demo/report.md
    qwenloop plot outputs/demo --out demo.png  # the curves elsewhere (a read-only run directory)

The curves: train and eval loss (skipped steps marked), learning rate, tokens/s, gradient norm and, under fp16,
the loss scale with the skipped (overflowed) steps marked. The report: final and best eval loss and perplexity,
tokens seen, time, peak memory per rank, backend, precision, world size, and the command and config that
reproduce the run. ``train()`` writes both at the end of every run (``finish_run``; the PNG only when matplotlib,
the ``plot`` extra, is installed). Both are built from the run's files alone.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shlex
import sys

from . import storage
from .errors import CommandParser, UserError
from .runlog import RunLog, finite, load_run

__all__ = ["command_line", "curves_figure", "plot_run", "report_markdown", "write_report", "finish_run", "main"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'qwenloop[plot]'"

# Environment a launcher sets that decides how the run ran (backend, precision, processes). Per-rank and
# per-launch values (RANK, LOCAL_RANK, MASTER_PORT) are left out: they are the launcher's business.
_LAUNCH_PREFIXES = ("ACCELERATE_", "FSDP_", "QWENLOOP_")
_LAUNCH_NAMES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")


def command_line(argv: list[str] | None = None, environ: dict | None = None, cwd: str | None = None) -> str:
    """The command this process runs, as one shell line: ``cd DIR && VAR=... python -m qwenloop train ...``.

    The working directory comes first because the config's relative paths are read from it; then the launcher's
    environment (accelerate passes the backend and precision of its config file to each rank that way), then the
    arguments, each quoted so that the line runs as it reads. ``train()`` stores it in run.json as ``command``."""
    argv = list(sys.argv if argv is None else argv)
    environ = os.environ if environ is None else environ
    program = _program(argv[0] if argv else "python")
    env = {k: v for k, v in environ.items() if k.startswith(_LAUNCH_PREFIXES) or k in _LAUNCH_NAMES}
    if env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() == "NO":  # torch.compile off: its 4 settings are noise
        env = {k: v for k, v in env.items() if not k.startswith("ACCELERATE_DYNAMO_")}
    words = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())] + program + [shlex.quote(a) for a in argv[1:]]
    return f"cd {shlex.quote(cwd or os.getcwd())} && " + " ".join(words)


def _program(argv0: str) -> list[str]:
    # `python -m qwenloop` (also what each `accelerate launch -m qwenloop` rank runs) shows up as .../qwenloop/__main__.py
    if os.path.basename(argv0) == "__main__.py" and os.path.basename(os.path.dirname(argv0)) == "qwenloop":
        return ["python", "-m", "qwenloop"]
    if os.path.basename(argv0) == "qwenloop":  # the console script
        return ["qwenloop"]
    return ["python", shlex.quote(argv0)]  # a script: examples/finetune.py, your own


# ---- the curves ----------------------------------------------------------------------------------------------


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"qwenloop plot: matplotlib is not installed; {INSTALL_HINT}") from None
    return Figure


def _series(steps: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], float(m[key])) for m in steps if finite(m.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _mark_skipped(ax, skipped: list[int]) -> None:
    for i, step in enumerate(skipped):  # one legend entry for all of them
        ax.axvline(step, color="tab:red", linestyle=":", linewidth=1, label="skipped step" if i == 0 else None)


def curves_figure(run: RunLog):
    """The figure ``plot_run`` saves: one panel per quantity, steps on every x axis. Returned unsaved so that a
    caller (or a test) can look at its axes."""
    from matplotlib.ticker import MaxNLocator

    Figure = _matplotlib()
    fp16 = any("loss_scale" in m for m in run.steps)  # logged under fp16 only
    panels = [("loss", _loss_panel), ("learning rate", _lr_panel), ("tokens/s", _speed_panel),
              ("gradient norm", _grad_panel)] + ([("loss scale (fp16)", _scale_panel)] if fp16 else [])
    rows = (len(panels) + 1) // 2
    fig = Figure(figsize=(12, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        fig.delaxes(ax)  # an odd number of panels leaves one cell empty
    for ax, (title, draw) in zip(axes, panels):
        draw(ax, run)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(_title(run))
    return fig


def _loss_panel(ax, run: RunLog) -> None:
    ax.plot(*_series(run.steps, "loss"), label="train loss", color="tab:blue")
    evals = [(m["step"], m["eval_loss"]) for m in run.evals]
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss", color="tab:orange")
    _mark_skipped(ax, run.skipped_steps())
    ax.set_ylabel("loss per target token")


def _lr_panel(ax, run: RunLog) -> None:
    ax.plot(*_series(run.steps, "lr"), color="tab:green")
    ax.set_ylabel("learning rate")


def _speed_panel(ax, run: RunLog) -> None:
    ax.plot(*_series(run.steps, "tokens_per_s"), label="tokens/s (all non-padding)")
    ax.plot(*_series(run.steps, "target_tokens_per_s"), label="target tokens/s (loss tokens)")
    ax.set_ylabel("tokens/s (mean since start)")  # what metrics.jsonl logs: the run's mean so far, not the step's


def _grad_panel(ax, run: RunLog) -> None:
    ax.plot(*_series(run.steps, "grad_norm"), color="tab:purple", label="gradient norm")
    clip = (run.config or {}).get("max_grad_norm")
    if finite(clip) and clip > 0:  # where clipping starts: norms above it were scaled down to it
        ax.axhline(clip, color="gray", linestyle="--", linewidth=1, label=f"max_grad_norm {clip:g}")
    _mark_skipped(ax, run.skipped_steps())  # non-finite norms are not drawn: the marks show where they were
    ax.set_ylabel("global norm (before clipping)")


def _scale_panel(ax, run: RunLog) -> None:
    ax.plot(*_series(run.steps, "loss_scale"), drawstyle="steps-post", color="tab:brown", label="loss scale")
    ax.set_yscale("log", base=2)  # the scaler halves and doubles it
    # The scale logged at a skipped step is the one the scaler fell back to after the overflow.
    over = [(m["step"], m["loss_scale"]) for m in run.steps if m.get("skipped") and finite(m.get("loss_scale"))]
    if over:
        ax.plot(*zip(*over), linestyle="none", marker="x", color="tab:red", label="skipped (overflow)")
    ax.set_ylabel("loss scale")


def _title(run: RunLog) -> str:
    if run.info is None:
        return f"{run.directory} (not finished)"
    return f"{run.directory}: {run.get('backend')}, {run.precision}, world size {run.get('world_size')}"


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # Agg, without pyplot: no display, no global figure state
    return buf.getvalue()


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write the run's curves as PNG to ``out`` (default ``RUN_DIR/curves.png``); returns the path."""
    return _plot(load_run(run_dir), out)


def _plot(run: RunLog, out: str | None) -> str:
    path = out or os.path.join(run.directory, "curves.png")
    _writable(path)  # before the figure is drawn: a wrong --out costs nothing
    data = _png_bytes(curves_figure(run))
    write_file_atomic(path, data)
    return path


def _writable(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{path}: its directory {parent} does not exist; create it or choose another path")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; give a file name")


def write_file_atomic(path: str, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` at once (written beside it, then renamed): a reader never sees half a PNG.
    A storage failure (full disk, read-only directory) is one line, the old file as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        storage.write_bytes(tmp, data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"{path}: could not write ({e.strerror or e}); free disk space or choose a writable "
                        f"location") from None


# ---- report.md -----------------------------------------------------------------------------------------------


def _loss_cell(record: dict | None) -> str:
    if record is None:
        return "no evaluation (no eval_file)"
    ppl = f", perplexity {record['eval_ppl']:.4g}" if finite(record.get("eval_ppl")) else ""
    return f"{record['eval_loss']:.4f}{ppl} (step {record.get('step')})"


def report_markdown(run: RunLog) -> str:
    """report.md's text: the run's outcome, cost and setup, and how to run it again."""
    last = run.steps[-1]
    seconds, kind = run.seconds()
    memory, memory_kind = run.memory_per_rank()
    rows = [
        ("status", "finished" if run.info else "not finished (no run.json: stopped, or still running)"),
        ("backend", run.get("backend", "?")),
        ("precision", run.precision + (" (no mixed precision)" if run.precision == "fp32" else " mixed precision")),
        ("world size", run.get("world_size", "?")),
        ("steps", f"{last['step']} (epoch {last.get('epoch', '?')})"),
        ("final train loss", f"{last['loss']:.4f} (step {last['step']})"),
        ("final eval loss", _loss_cell(run.final_eval())),
        ("best eval loss", _loss_cell(run.best_eval())),
        ("tokens seen", _tokens(run, last)),
        ("time", f"{seconds:.1f} s ({kind})" if seconds is not None else "unknown"),
        ("throughput", _throughput(run, last)),
        ("peak memory per rank", ", ".join(f"rank {i}: {g:.2f} GiB" for i, g in enumerate(memory)) + f" ({memory_kind})"
         if memory else "unknown"),
        ("skipped steps", f"{len(run.skipped_steps())} (non-finite or fp16 overflow)"),
    ]
    if run.get("resumed_from"):
        rows.append(("resumed from", f"`{run.get('resumed_from')}` (time and throughput: this process's part)"))
    lines = [f"# {run.name}", "", f"Run `{(run.run_id or {}).get('run_id', '?')}` in `{run.directory}`, started "
             f"{(run.run_id or {}).get('started', '?')}.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if os.path.isfile(os.path.join(run.directory, "curves.png")):
        lines += ["", "![curves](curves.png)"]
    lines += ["", "## Reproduce", ""] + _reproduce(run)
    if run.dropped_lines:
        lines += ["", f"metrics.jsonl lines left out (not JSON): {', '.join(map(str, run.dropped_lines))}."]
    return "\n".join(lines) + "\n"


def _tokens(run: RunLog, last: dict) -> str:
    tokens = run.get("tokens_seen", last.get("tokens"))
    targets = run.get("target_tokens_seen", last.get("target_tokens"))
    if tokens is None:
        return "unknown"
    return f"{tokens:,} ({targets:,} of them loss targets)" if targets is not None else f"{tokens:,}"


def _throughput(run: RunLog, last: dict) -> str:
    tps, tgt = run.get("tokens_per_s", last.get("tokens_per_s")), run.get("target_tokens_per_s", last.get("target_tokens_per_s"))
    if not finite(tps):
        return "unknown"
    mfu = f", MFU {run.get('mfu'):.1%}" if finite(run.get("mfu")) else ""
    return f"{tps:,.0f} tokens/s, {tgt:,.0f} target tokens/s{mfu}"


def _reproduce(run: RunLog) -> list[str]:
    command = run.get("command")
    if command:
        head = ["The command (each rank of a launched run ran it with this environment; `accelerate launch` with the "
                "same accelerate config sets it):", "", "```bash", command, "```"]
    else:
        head = ["The command was not recorded (run.json has no `command`). The training config below is the one the "
                "run used; its backend and precision came from the accelerate config it was launched with."]
    if run.config is None:
        return head + ["", "config.yaml: not found."]
    import yaml

    text = yaml.safe_dump(run.config, sort_keys=False).rstrip()
    # Folded (GitHub and most viewers render <details>): the report stays one screen, the config stays exact.
    return head + ["", "<details><summary>The training config (<code>config.yaml</code>; give <code>output_dir</code> "
                   "a new directory before rerunning)</summary>", "", "```yaml", text, "```", "", "</details>"]


def write_report(run_dir: str) -> str:
    """Write ``RUN_DIR/report.md`` (replaced atomically); returns its path."""
    return _write_report(load_run(run_dir))


def _write_report(run: RunLog) -> str:
    path = os.path.join(run.directory, "report.md")
    _writable(path)
    write_file_atomic(path, report_markdown(run))
    return path


def finish_run(output_dir: str) -> list[str]:
    """What ``train()`` calls on the main process once run.json is written: the curves (when matplotlib is
    installed) and report.md. Never fails the run: the adapter is saved by now, and a plot is not worth a
    non-zero exit; a problem is logged and the rest still written. Returns the paths written."""
    written = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("curves.png not written: matplotlib is not installed (%s; then qwenloop plot %s)", INSTALL_HINT, output_dir)
    else:
        try:
            written.append(plot_run(output_dir))
        except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
            logger.warning("curves.png not written: %s: %s", type(e).__name__, e)
    try:
        written.append(write_report(output_dir))  # after the curves: the report shows them when they exist
    except Exception as e:  # noqa: BLE001 - nor must the report
        logger.warning("report.md not written: %s: %s", type(e).__name__, e)
    return written


# ---- command line --------------------------------------------------------------------------------------------



def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="qwenloop plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's output_dir (holding metrics.jsonl)")
    p.add_argument("--out", help="where to write the PNG (default: RUN_DIR/curves.png)")
    p.add_argument("--no-report", action="store_true", help="only the curves, not RUN_DIR/report.md")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    run = load_run(args.run_dir)  # every check before anything is written (_plot checks matplotlib and --out)
    print(_plot(run, args.out))
    if not args.no_report:
        print(_write_report(run))
    return 0
