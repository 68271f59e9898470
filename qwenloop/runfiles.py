"""The run's files in ``output_dir`` as the loop writes them: started (a previous run moved aside, or a resumed
one's metrics cut back to its checkpoint), appended to once per logged step, summed up in ``run.json``.

Each write is made whole or not at all (``storage``), and every rank learns its outcome (``agreement``): a
full disk ends every rank with one line, exit code 2, the checkpoints as they were.
"""

from __future__ import annotations

import json
import logging
import os

from . import agreement, checkpoint, storage
from .runlog import parse_metrics_lines

logger = logging.getLogger("qwenloop")


def start_run_files(cfg, accelerator, state, resumed_from: str | None = None) -> None:
    """Once everything loaded, on the main process: the run's files in ``output_dir``.

    A fresh run first moves any previous run there aside (``checkpoint.move_run_aside``; the checks allowed it:
    ``overwrite_output_dir``, or ``auto`` over an attempt that left nothing to resume) and gets a new run id. A
    resumed run keeps its checkpoint's id, moves aside the adapter and run.json of an earlier finish (it will
    write its own), and keeps the metrics lines up to the checkpoint's step (steps redone after it are not
    listed twice; a line torn by a kill is dropped). Then ``config.yaml`` and ``run_id.json``, each replaced
    atomically. A failure (disk full) ends every rank with one line."""
    accelerator.wait_for_everyone()  # every rank has checked the directory before it changes
    failure = None
    if accelerator.is_main_process:
        try:
            _write_start_files(cfg, state, resumed_from)
        except OSError as e:
            why = storage.write_failure(e, cfg.output_dir)
            failure = f"output_dir: could not prepare {cfg.output_dir} ({why}); free disk space or choose a writable output_dir"
    agreement.raise_if_any(accelerator, failure, "output_dir: the main process could not prepare the run's files (see its error)")


def _write_start_files(cfg, state, resumed_from: str | None) -> None:
    import yaml

    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    dir_run = checkpoint.current_run_id(cfg.output_dir)
    if resumed_from is None:
        why = ("overwrite_output_dir" if cfg.overwrite_output_dir else
               "resume_from: auto found nothing to continue" if cfg.resume_from == "auto" else "a new run")
        checkpoint.move_run_aside(cfg.output_dir, why)
        state.run_id = checkpoint.new_run_id()
        kept = []
    else:
        state.run_id = state.run_id or dir_run or checkpoint.new_run_id()  # an older checkpoint has no id
        root = os.path.abspath(checkpoint.checkpoints_root(cfg.output_dir))
        elsewhere = os.path.commonpath([os.path.abspath(resumed_from), root]) != root
        if dir_run not in (None, state.run_id) and elsewhere:  # continuing another run here: this one's files go aside
            checkpoint.move_run_aside(cfg.output_dir, f"resuming run {state.run_id} from {resumed_from}")
        # Resumed on purpose from a run that had finished: nothing may say "finished" until this run has.
        checkpoint.move_run_aside(cfg.output_dir, "resuming a run that had finished", only=checkpoint.FINISHED_ENTRIES)
        kept = _metrics_up_to(path, state.step)
    storage.write_text_atomic(path, "".join(kept))
    storage.write_text_atomic(os.path.join(cfg.output_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    checkpoint.write_run_id(cfg.output_dir, state.run_id)


def _metrics_up_to(path: str, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``step``. A line that is not JSON (the last one cut short by a kill
    mid-write, or one damaged later) is dropped, and said so: a metrics file never stops a resume."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    parsed, dropped = parse_metrics_lines(lines)
    kept = [raw.decode("utf-8") + "\n" for raw, record in parsed if record.get("step", 0) <= step]
    last = max((n for n, raw in enumerate(lines, 1) if raw.strip()), default=0)
    if dropped == [last]:
        logger.warning("%s: dropped its last line (%d bytes, not complete JSON): the process was stopped while "
                       "writing it", path, len(lines[last - 1]))
    elif dropped:
        logger.warning("%s: dropped line(s) %s: not JSON", path, ", ".join(map(str, dropped)))
    return kept

def log_metrics(accelerator, path: str, record: dict) -> None:
    """Append the record to ``metrics.jsonl`` (main process; a line the disk cannot take is cut back off, never
    left torn) and to the trackers. A full disk ends every rank with one line (exit code 2), the checkpoints as
    they were."""
    failure = None
    if accelerator.is_main_process:
        try:
            storage.append_line(path, json.dumps(record))
        except OSError as e:
            latest = checkpoint.find_latest(os.path.dirname(path))
            kept = f"the newest checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
            failure = (f"metrics: could not append step {record.get('step')} to {path} ({e.strerror or e}); {kept}; "
                       f"free disk space, then resume with resume_from: auto")
    # every rank stops together (a rank stopping alone would hang the others)
    agreement.raise_if_any(accelerator, failure, "metrics: the main process could not append to metrics.jsonl (see its error)")
    numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if accelerator.trackers:
        accelerator.log(numeric, step=record["step"])

def write_run_summary(accelerator, path: str, summary: dict | None) -> None:
    """``run.json``, written whole or not at all (main process). The adapter is already in place: a full disk
    here ends every rank with one line saying so, instead of a traceback on one and a hang on the others."""
    failure = None
    if summary is not None:
        try:
            storage.write_text_atomic(path, json.dumps(summary, indent=1))
        except OSError as e:
            failure = (f"run.json: could not write {path} ({e.strerror or e}); the adapter and metrics.jsonl of this "
                       f"run are complete in {os.path.dirname(path)}; free disk space (run.json is the run's summary)")
    agreement.raise_if_any(accelerator, failure, "run.json: the main process could not write the run's summary (see its error)")
