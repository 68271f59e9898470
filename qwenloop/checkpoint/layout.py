"""Checkpoints on disk: their layout under ``output_dir/checkpoints/``, finding them, their manifest
(``COMPLETE``), verifying them before a resume, retention and the cleanup of partial ones. Imports no other module
of ``checkpoint``: ``runs``, ``state`` and ``saver`` build on it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

from .. import storage

logger = logging.getLogger("qwenloop")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 2  # 2: COMPLETE is a manifest (files, sizes, SHA-256) and checkpoints carry the run's id


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _step_of(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-"):])
    except ValueError:
        return None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as ``(step, path)``, oldest first. Partial directories are not listed."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        step = _step_of(name)
        path = os.path.join(root, name)
        if step is not None and is_complete(path):
            found.append((step, path))
    return sorted(found)


def find_latest(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_json(path: str):
    """A JSON file's content, or None when it is missing or unreadable (torn, edited, not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_manifest(path: str) -> dict | None:
    """The checkpoint's ``COMPLETE`` marker as a dict (``files`` absent in checkpoints older than manifests)."""
    marker = read_json(os.path.join(path, MARKER))
    return marker if isinstance(marker, dict) else None


def checkpoint_run_id(path: str) -> str | None:
    """The id of the run that wrote the checkpoint; None for checkpoints older than run ids."""
    for source in (read_manifest(path), read_json(os.path.join(path, STATE_FILE))):
        if isinstance(source, dict) and source.get("run_id"):
            return str(source["run_id"])
    return None


@dataclass(frozen=True)
class Verdict:
    problem: str | None  # why it cannot be resumed from; None: it verifies
    legacy: bool = False  # written before manifests: its files' presence was checked, not their content


# (path, every file's size and mtime) -> verdict: the pre-flight check and the resume that follows it read the
# files once; any change to a file since is a new key.
_verdicts: dict[tuple, Verdict] = {}


def verify_checkpoint(path: str) -> Verdict:
    """Check a complete checkpoint before it is resumed from: every file its manifest lists has the listed
    size and SHA-256, its trainer state is readable and belongs to its step, and every rank's RNG state is
    there. Reads every file (the cost of an exact resume: seconds per GB)."""
    if not is_complete(path):
        return Verdict(f"it has no {MARKER} marker (a save that was interrupted?)")
    key = (os.path.realpath(path), _file_stats(path))
    if key not in _verdicts:
        _verdicts[key] = _verify(path)
    return _verdicts[key]


def _file_stats(path: str) -> tuple:
    stats = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            stats.append((os.path.relpath(os.path.join(dirpath, name), path), st.st_size, st.st_mtime_ns))
    return tuple(stats)


def _verify(path: str) -> Verdict:
    manifest = read_manifest(path)
    if manifest is None:
        return Verdict(f"its {MARKER} marker is unreadable")
    listed = manifest.get("files")
    if isinstance(listed, dict):
        for rel, want in sorted(listed.items()):
            problem = _file_problem(path, rel, want)
            if problem:
                return Verdict(problem)
    legacy = not isinstance(listed, dict)
    state = read_json(os.path.join(path, STATE_FILE))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return Verdict(f"{STATE_FILE} is missing or unreadable", legacy)
    if _step_of(os.path.basename(os.path.normpath(path))) not in (None, state["step"]):
        return Verdict(f"{STATE_FILE} is of step {state['step']}, not of this directory's", legacy)
    required = [STATE_FILE, "scheduler.pt", os.path.join("adapter", "adapter_model.safetensors")]
    world = (state.get("identity") or {}).get("world_size", 1)
    required += [os.path.join("rng", f"rank-{rank:05d}.pt") for rank in range(int(world))]
    for rel in required:
        if not os.path.isfile(os.path.join(path, rel)):
            return Verdict(f"{rel} is missing", legacy)
    optimizer = os.path.join(path, "optimizer")
    if not os.path.isdir(optimizer) or not os.listdir(optimizer):
        return Verdict("optimizer/ is missing or empty", legacy)
    return Verdict(None, legacy)


def _file_problem(path: str, rel: str, want: dict) -> str | None:
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
        return f"{rel} is missing"
    size = os.path.getsize(full)
    if size != want.get("size"):
        return f"{rel} has {size} bytes, its manifest says {want.get('size')} (truncated or replaced)"
    if storage.sha256_file(full) != want.get("sha256"):
        return f"{rel} does not match its SHA-256 (changed or damaged since it was written)"
    return None


def write_manifest(directory: str, step: int, run_id: str) -> None:
    """``COMPLETE``: the run's id and every file's size and SHA-256. Written last, once every rank's files are
    in ``directory``."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel != MARKER:
                files[rel] = {"size": os.path.getsize(full), "sha256": storage.sha256_file(full)}
    marker = {"format": FORMAT_VERSION, "step": step, "run_id": run_id, "time": time.time(), "files": files}
    storage.write_text(os.path.join(directory, MARKER), json.dumps(marker, indent=1) + "\n")


def newest_resumable(output_dir: str, run_id: str | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint that verifies (and, given ``run_id``, was not written by another run),
    and the newer ones passed over, each with the reason."""
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        owner = checkpoint_run_id(path)
        if run_id and owner and owner != run_id:
            skipped.append((path, f"written by another run ({owner}; {output_dir} holds run {run_id})"))
            continue
        verdict = verify_checkpoint(path)
        if verdict.problem:
            skipped.append((path, verdict.problem))
            continue
        return path, skipped
    return None, skipped


def remove_partial(output_dir: str) -> list[str]:
    """Delete temporary directories and step directories without a completion marker (left by a
    crash or a kill during a save). Returns what was removed."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if name.startswith(TMP_PREFIX) or (_step_of(name) is not None and not is_complete(path)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.warning("removed %d incomplete checkpoint(s): %s", len(removed), ", ".join(removed))
    return removed


def prune(output_dir: str, keep: int, run_id: str | None = None) -> list[str]:
    """Keep the ``keep`` newest complete checkpoints (0: keep all). Only complete ones count, so a
    new checkpoint must be complete before an old one goes; given ``run_id``, only that run's count and go
    (another run's checkpoints are never taken for older ones of this run)."""
    if keep <= 0:
        return []
    mine = [path for _, path in list_checkpoints(output_dir)
            if not run_id or checkpoint_run_id(path) in (None, run_id)]
    doomed = mine[:-keep]
    for path in doomed:
        # Marker first: a deletion cut short leaves a directory that is no longer taken for complete.
        try:
            os.remove(os.path.join(path, MARKER))
        except FileNotFoundError:
            pass
        shutil.rmtree(path, ignore_errors=True)
    return doomed
