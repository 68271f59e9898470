"""The output directory, holding one run at a time: what a run left there, its id (``run_id.json``), moving a
replaced run aside (``output_dir/replaced/<time>/``), and which checkpoint a run continues from
(``resolve_resume``, ``resume_from: auto``). Builds on ``layout``."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass

from .. import storage
from ..errors import UserError
from .layout import (CHECKPOINTS, MARKER, TMP_PREFIX, checkpoints_root, is_complete, list_checkpoints,
                     newest_resumable, read_json, verify_checkpoint)

logger = logging.getLogger("qwenloop")

RUN_ID_FILE = "run_id.json"
REPLACED = "replaced"  # where a replaced run's files go (output_dir/replaced/<time>/)
# What only a run writes into output_dir: what marks a directory as holding a run, and what replacing it moves
# aside (with tensorboard's logs, accelerate's `runs/`). config.yaml is copied aside, not moved: a user may keep
# the config they launch with there (the new run rewrites it anyway). Other files of the user's are left alone.
RUN_ENTRIES = ("metrics.jsonl", "run.json", RUN_ID_FILE, "adapter", CHECKPOINTS, "nonfinite_report.json")
MOVED_ENTRIES = RUN_ENTRIES + ("runs", "report.md", "curves.png")  # what `qwenloop plot` may also write: not a sign of a run
COPIED_ENTRIES = ("config.yaml",)
FINISHED_ENTRIES = ("adapter", "run.json")  # written at the end only: the run finished


# --------------------------------------------------------------------------------------------
# the output directory: one run at a time
# --------------------------------------------------------------------------------------------


@dataclass
class PreviousRun:
    """What a run left in ``output_dir``."""

    entries: list[str]  # RUN_ENTRIES present
    finished: list[str]  # FINISHED_ENTRIES present: the run ended with its adapter
    checkpoints: list[str]  # complete checkpoints (of any run), oldest first

    @property
    def exists(self) -> bool:
        return bool(self.entries)


def previous_run(output_dir: str) -> PreviousRun:
    present = [e for e in RUN_ENTRIES if os.path.lexists(os.path.join(output_dir, e))]
    return PreviousRun(entries=present, finished=[e for e in FINISHED_ENTRIES if e in present],
                       checkpoints=[path for _, path in list_checkpoints(output_dir)])


def current_run_id(output_dir: str) -> str | None:
    """The id of the run ``output_dir`` holds (None: none, or one older than run ids)."""
    data = read_json(os.path.join(output_dir, RUN_ID_FILE))
    return str(data["run_id"]) if isinstance(data, dict) and data.get("run_id") else None


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def previous_run_problem(cfg) -> str | None:
    """Why ``cfg`` may not start in its ``output_dir`` (checked before anything loads; None: it may). A
    previous run is replaced only when asked (``overwrite_output_dir``); ``resume_from: auto`` continues an
    unfinished one and never replaces a finished one."""
    run = previous_run(cfg.output_dir)
    if not run.exists or cfg.overwrite_output_dir:
        return None
    where = f"{cfg.output_dir} already holds a previous run ({', '.join(run.entries)})"
    replaced = os.path.join(cfg.output_dir, REPLACED)
    again = f"set overwrite_output_dir: true to train it again (the old run is moved to {replaced}/)"
    if cfg.resume_from == "auto" and run.finished:
        return (f"{where} that finished ({', '.join(run.finished)} written): resume_from: auto has nothing to "
                f"continue and would replace it; choose another output_dir, or {again}")
    if cfg.resume_from is None:
        if run.finished:
            return f"{where} that finished; choose another output_dir, or {again}"
        return (f"{where}; choose another output_dir, set resume_from: auto to continue it, or set "
                f"overwrite_output_dir: true to replace it (the old run is moved to {replaced}/)")
    return None


def move_run_aside(output_dir: str, reason: str, only: tuple[str, ...] | None = None) -> str | None:
    """Move every file of the run in ``output_dir`` (or those of ``only``) into ``output_dir/replaced/<time>/``:
    renames (config.yaml copied), nothing deleted. Returns that directory, None when there was nothing to move."""
    leftovers = ("adapter.tmp-", "adapter.old-")  # an adapter write cut short
    entries = [e for e in os.listdir(output_dir) if e in MOVED_ENTRIES or e.startswith(leftovers)]
    entries = [e for e in entries if only is None or e in only]
    if not entries:
        return None
    copied = [e for e in COPIED_ENTRIES if only is None and os.path.isfile(os.path.join(output_dir, e))]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = os.path.join(output_dir, REPLACED, stamp)
    for n in itertools.count(1):
        if not os.path.exists(target):
            break
        target = os.path.join(output_dir, REPLACED, f"{stamp}-{n}")
    os.makedirs(target)
    for entry in sorted(entries):
        os.replace(os.path.join(output_dir, entry), os.path.join(target, entry))
    for entry in copied:
        shutil.copy2(os.path.join(output_dir, entry), os.path.join(target, entry))
    storage.fsync_dir(output_dir)
    logger.warning("%s: the previous run's files (%s) were moved to %s; delete them when you no longer need them",
                   reason, ", ".join(sorted(entries + copied)), target)
    return target


def write_run_id(output_dir: str, run_id: str) -> None:
    storage.write_text_atomic(os.path.join(output_dir, RUN_ID_FILE),
                              json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


# --------------------------------------------------------------------------------------------
# which checkpoint a run continues from
# --------------------------------------------------------------------------------------------


@dataclass
class AutoChoice:
    """What ``resume_from: auto`` does in ``output_dir``."""

    path: str | None  # the checkpoint to resume from; None: start fresh
    skipped: list[tuple[str, str]]  # newer checkpoints passed over, with the reason
    problem: str | None = None  # why it can do neither (an error)


def choose_auto(cfg) -> AutoChoice:
    """``resume_from: auto``: the newest checkpoint of the directory's run that verifies. It starts fresh only
    where there is nothing to continue: no checkpoint at all (an unfinished attempt that wrote none is moved
    aside when the run starts), or a previous run that ``overwrite_output_dir`` replaces."""
    run = previous_run(cfg.output_dir)
    if run.finished:  # refused by previous_run_problem unless replaced
        return AutoChoice(None, [])
    path, skipped = newest_resumable(cfg.output_dir, current_run_id(cfg.output_dir))
    if path or not skipped or cfg.overwrite_output_dir:
        return AutoChoice(path, skipped)
    why = "; ".join(f"{os.path.basename(p)}: {reason}" for p, reason in skipped)
    return AutoChoice(None, skipped, (
        f"resume_from: auto found no checkpoint in {checkpoints_root(cfg.output_dir)} that can be resumed from "
        f"({why}); restore them, point resume_from at a checkpoint elsewhere, or set overwrite_output_dir: true to "
        f"start over (the old run is moved to {os.path.join(cfg.output_dir, REPLACED)}/)"))


def resolve_resume(cfg, announce: bool = True) -> str | None:
    """The checkpoint directory ``resume_from`` points to (None: start from scratch), verified. ``announce``:
    log the checkpoints ``auto`` skipped (the main process; the others decide the same, quietly)."""
    value = cfg.resume_from
    if value is None:
        return None
    if value == "auto":
        problem = previous_run_problem(cfg)
        if problem:
            raise UserError(f"output_dir: {problem}")
        choice = choose_auto(cfg)
        if choice.problem:
            raise UserError(choice.problem)
        if announce:
            _announce_skipped(choice.skipped, choice.path)
            if choice.path is None:
                logger.warning("resume_from: auto found no checkpoint to continue in %s: starting from step 0",
                               checkpoints_root(cfg.output_dir))
        return choice.path
    path = os.path.expanduser(str(value))
    if not os.path.isdir(path):
        raise UserError(f"resume_from: {path} does not exist; give a checkpoint directory "
                        f"(output_dir/{CHECKPOINTS}/step-NNNNNNN), auto, or null")
    if not is_complete(path):
        return _newest_in_given_directory(path, announce)
    verdict = verify_checkpoint(path)
    if verdict.problem:
        older = [p for _, p in list_checkpoints(os.path.dirname(os.path.dirname(os.path.abspath(path))))
                 if p != os.path.abspath(path) and not verify_checkpoint(p).problem]
        hint = f"point it at an earlier checkpoint (e.g. {older[-1]})" if older else "point it at another checkpoint"
        raise UserError(f"resume_from: {path} cannot be resumed from: {verdict.problem}; {hint}, or use auto (the "
                        f"newest checkpoint that verifies)")
    return path


def _newest_in_given_directory(path: str, announce: bool) -> str:
    """``resume_from`` naming an output_dir (or its checkpoints/): its newest checkpoint that verifies."""
    trimmed = path.rstrip(os.sep)
    output_dir = os.path.dirname(trimmed) if os.path.basename(trimmed) == CHECKPOINTS else trimmed
    found, skipped = newest_resumable(output_dir, current_run_id(output_dir))
    if found is not None:
        if announce:
            _announce_skipped(skipped, found)
        return found
    if skipped:
        why = "; ".join(f"{os.path.basename(p)}: {reason}" for p, reason in skipped)
        raise UserError(f"resume_from: no checkpoint in {path} can be resumed from ({why}); point it at another "
                        f"checkpoint")
    raise UserError(f"resume_from: {path} is not a complete checkpoint (no {MARKER} marker: a save that "
                    f"was interrupted?); point it at a complete step-NNNNNNN directory or use auto")


def _announce_skipped(skipped: list[tuple[str, str]], chosen: str | None) -> None:
    for path, reason in skipped:
        logger.warning("resume: skipped %s: %s%s", path, reason, f"; resuming from {chosen}" if chosen else "")


def check_output_dir(output_dir: str) -> None:
    """Fail before anything is loaded (and without creating anything) when ``output_dir`` cannot be written."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    elif existing == os.path.abspath(output_dir):
        probe = os.path.join(existing, f"{TMP_PREFIX}write-test-{os.getpid()}")
        try:
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise UserError(f"output_dir: {output_dir} is not writable ({problem}); choose a writable output_dir")
