"""A finished (or stopped) run, read back from its ``output_dir``: what ``qwenloop plot`` and ``qwenloop compare``
read, and the numbers both derive from it (so the report, the curves and the comparison table say the same).

Reads ``metrics.jsonl`` (required), ``run.json`` (written at the end of a run; absent when it was stopped or is
still running), ``config.yaml`` and ``run_id.json``. Imports nothing of training (no torch): the after-training
tools stay light, and nothing here can change a run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from .errors import UserError

__all__ = ["RunLog", "load_run", "finite"]


def finite(value) -> bool:
    """A number that can be drawn or compared (metrics.jsonl holds NaN / Infinity for non-finite steps, null for
    a gradient norm that was not computed)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunLog:
    directory: str
    metrics: list[dict]  # every readable line of metrics.jsonl, in file order
    info: dict | None = None  # run.json; None: the run has not finished
    config: dict | None = None  # config.yaml: the training config the run used
    run_id: dict | None = None  # run_id.json: id and start time
    dropped_lines: list[int] = field(default_factory=list)  # metrics.jsonl lines that were not JSON

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.directory)) or self.directory

    @property
    def steps(self) -> list[dict]:
        """Training-step lines (they carry ``loss``; the final evaluation has a line of its own without it).
        A step logged twice (it should not be) counts once, the later line winning."""
        by_step = {m["step"]: m for m in self.metrics if "loss" in m and isinstance(m.get("step"), int)}
        return [by_step[s] for s in sorted(by_step)]

    @property
    def evals(self) -> list[dict]:
        """Evaluation results in step order: mid-run ones ride on a step's line, the final one has its own."""
        return sorted((m for m in self.metrics if finite(m.get("eval_loss"))), key=lambda m: m.get("step", 0))

    def final_eval(self) -> dict | None:
        evals = self.evals
        return evals[-1] if evals else None

    def best_eval(self) -> dict | None:
        evals = self.evals
        return min(evals, key=lambda m: m["eval_loss"]) if evals else None

    def losses_by_step(self) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in self.steps}

    def skipped_steps(self) -> list[int]:
        """Steps whose update was skipped: a non-finite loss / gradient, or an fp16 overflow (every such step is
        logged, whatever ``log_every_steps`` says)."""
        return [m["step"] for m in self.steps if m.get("skipped")]

    @property
    def precision(self) -> str:
        """run.json's precision as a reader says it: accelerate's "no" (no mixed precision) is fp32."""
        value = self.get("precision")
        return "fp32" if value == "no" else str(value or "unknown")

    def get(self, key: str, default=None):
        """A value of run.json (None when the run has not finished)."""
        return (self.info or {}).get(key, default)

    def seconds(self) -> tuple[float | None, str]:
        """The run's time and what it measures: ``wall_seconds`` (start to end of train(), loading and saving
        included) when run.json has it, else ``train_seconds`` (the training steps only)."""
        if finite(self.get("wall_seconds")):
            return float(self.get("wall_seconds")), "wall"
        if finite(self.get("train_seconds")):
            return float(self.get("train_seconds")), "training steps"
        return None, "unknown"

    def memory_per_rank(self) -> tuple[list[float], str]:
        """Every rank's peak memory in GiB and its kind: GPU memory allocated (the reserved figure is in run.json),
        or the process's peak RSS on a CPU run."""
        rows = self.get("peak_memory_per_rank") or []
        if rows and all("allocated_gib" in r for r in rows):
            return [float(r["allocated_gib"]) for r in rows], "GPU allocated"
        if rows and all("rss_gib" in r for r in rows):
            return [float(r["rss_gib"]) for r in rows], "CPU peak RSS"
        return [], "unknown"

    def global_batch(self) -> tuple[int, int, int] | None:
        """(micro_batch_size, gradient_accumulation_steps, processes): their product is the batch of one step."""
        cfg, world = self.config or {}, self.get("world_size")
        try:
            return int(cfg["micro_batch_size"]), int(cfg["gradient_accumulation_steps"]), int(world)
        except (KeyError, TypeError, ValueError):
            return None


def load_run(run_dir: str, need_info: bool = False, need_config: bool = False) -> RunLog:
    """Read a run directory; bad input is one ``UserError`` line naming the file and what to do."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: not a directory; pass a run's output_dir (the directory holding its metrics.jsonl)")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; {run_dir} is not a qwenloop run directory (pass the output_dir a "
                        f"`qwenloop train` run wrote its metrics.jsonl to)")
    metrics, dropped = _read_metrics(path)
    run = RunLog(run_dir, metrics, dropped_lines=dropped)
    if not run.steps:
        raise UserError(f"{path}: no training step logged yet; plot or compare a run once it has logged a step")
    run.info = _read_json(os.path.join(run_dir, "run.json"), required=need_info,
                          why="the run has not finished (stopped, or still running); compare finished runs")
    run.run_id = _read_json(os.path.join(run_dir, "run_id.json"), required=False, why="")
    run.config = _read_config(os.path.join(run_dir, "config.yaml"), required=need_config)
    return run


def _read_metrics(path: str) -> tuple[list[dict], list[int]]:
    # A line cut short by a kill, or damaged later, is left out (as a resume does): curves of the rest still help.
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    parsed, dropped = parse_metrics_lines(lines)
    return [record for _, record in parsed], dropped


def parse_metrics_lines(lines: list[bytes]) -> tuple[list[tuple[bytes, dict]], list[int]]:
    """``metrics.jsonl``'s lines as ``(raw line, record)`` pairs, and the (1-based) numbers of the lines that are
    not a JSON object: the last one cut short by a kill mid-write, or one damaged later. Blank lines are skipped.
    Shared by the resume (train.py), which drops such lines and says so, and by plot / report / compare."""
    parsed, dropped = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            dropped.append(number)
            continue
        if isinstance(record, dict):
            parsed.append((raw, record))
        else:
            dropped.append(number)
    return parsed, dropped


def _read_json(path: str, required: bool, why: str) -> dict | None:
    if not os.path.isfile(path):
        if required:
            raise UserError(f"{path}: not found: {why}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); it is written by train() at the end of a run, restore or rerun it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; it is written by train() at the end of a run, restore or rerun it")
    return data


def _read_config(path: str, required: bool) -> dict | None:
    import yaml

    if not os.path.isfile(path):
        if required:
            raise UserError(f"{path}: not found: compare checks that the runs trained the same job from their "
                            f"config.yaml; pass --force to compare without it")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not readable YAML ({' '.join(str(e).split())}); restore the config the run used") from None
    return data if isinstance(data, dict) else None
