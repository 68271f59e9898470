"""Trainer state on disk: resumable checkpoints, written atomically, found, loaded back, pruned.

``output_dir/checkpoints/step-0000042/``::

    adapter/              adapter_model.safetensors + adapter_config.json (PEFT format, adapter.py's writer)
    optimizer/            the backend's optimizer state: one file (single/DDP/FSDP), or one ZeRO-3 partition
                          per rank; the fp16 GradScaler's state next to it
    scheduler.pt          the LR scheduler's state_dict
    rng/rank-NNNNN.pt     python / numpy / torch (/cuda) RNG states of every rank
    trainer_state.json    step, data position (epoch, micro-batches consumed in it, sampler seed), what
                          must match for an exact resume, tokens seen, NaN-sentinel counters
    config.yaml           the training config used
    COMPLETE              written last; a directory without it is never resumed from (and is removed)

The frozen base is never in a checkpoint: only trainable parameters and their optimizer state.
Tensors are written with safetensors / ``torch.save`` and read back with ``weights_only=True``.

Atomicity: everything is written into ``checkpoints/.tmp-step-NNNNNNN``, fsynced, renamed to
``step-NNNNNNN``, and only then is ``COMPLETE`` written (and fsynced). Retention deletes older
checkpoints only once the new one is complete. A failed write (disk full, unwritable directory)
removes the temporary directory, leaves every earlier checkpoint as it was, and raises ``UserError``.

Files are written through ``storage`` (fsynced; ``weights_only`` loads); the test-only fault hooks
(``QWENLOOP_FAULT``) are in ``faults``, preemption signals in ``signals``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field

import torch

from . import faults, storage
from .errors import RunStopped, UserError, exit_code_for_signal

logger = logging.getLogger("qwenloop")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# finding, retention, cleanup
# --------------------------------------------------------------------------------------------


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


def prune(output_dir: str, keep: int) -> list[str]:
    """Keep the ``keep`` newest complete checkpoints (0: keep all). Only complete ones count, so a
    new checkpoint must be complete before an old one goes."""
    if keep <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(output_dir)[:-keep]]
    for path in doomed:
        # Marker first: a deletion cut short leaves a directory that is no longer taken for complete.
        try:
            os.remove(os.path.join(path, MARKER))
        except FileNotFoundError:
            pass
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_resume(cfg) -> str | None:
    """The checkpoint directory ``resume_from`` points to (None: start from scratch)."""
    value = cfg.resume_from
    if value is None:
        return None
    if value == "auto":
        path = find_latest(cfg.output_dir)
        if path is None:
            logger.warning("resume_from: auto found no complete checkpoint in %s: starting from step 0",
                           checkpoints_root(cfg.output_dir))
        return path
    path = os.path.expanduser(str(value))
    if not os.path.isdir(path):
        raise UserError(f"resume_from: {path} does not exist; give a checkpoint directory "
                        f"(output_dir/{CHECKPOINTS}/step-NNNNNNN), auto, or null")
    if not is_complete(path):
        inner = find_latest(path.removesuffix(os.sep + CHECKPOINTS)) if os.path.basename(path) == CHECKPOINTS else find_latest(path)
        if inner is not None:
            return inner  # an output_dir (or its checkpoints/) was given: its newest complete checkpoint
        raise UserError(f"resume_from: {path} is not a complete checkpoint (no {MARKER} marker: a save that "
                        f"was interrupted?); point it at a complete step-NNNNNNN directory or use auto")
    return path


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


# --------------------------------------------------------------------------------------------
# what a resumed run continues from
# --------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """Everything the loop needs to continue, besides the model / optimizer / scheduler / RNG."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed by each process
    sampler_seed: int = 0
    tokens_seen: int = 0  # non-padding tokens trained on, all ranks
    target_tokens_seen: int = 0  # target (loss) tokens trained on, all ranks
    sentinel: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)  # what must match for an exact continuation

    def advance(self, micro_batches: int, per_epoch: int) -> None:
        """One optimizer step consumed ``micro_batches``; an epoch holds ``per_epoch`` of them."""
        self.step += 1
        self.batches_in_epoch += micro_batches
        if self.batches_in_epoch >= per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0


# Identity keys newer than some checkpoints, with the value every run had before the key existed.
IDENTITY_ADDED_LATER = {"packing": False, "group_by_length": False}


def run_identity(cfg, world_size: int, train_data) -> dict:
    """The settings that decide which examples each step sees: a resume with other values would not
    continue the same training (refused unless ``force_resume``)."""
    return {
        "world_size": int(world_size),
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "seed": cfg.seed,
        "packing": cfg.packing,
        "group_by_length": cfg.group_by_length,
        "train_examples": len(train_data.dataset),
        "train_target_tokens": int(train_data.target_tokens),
    }


def epoch_batches(accelerator, train_loader, epoch: int, skip: int = 0):
    """An iterator over this process's micro-batches of ``epoch``, the first ``skip`` left out
    without loading them (``accelerator.skip_first_batches``: the batch sampler skips indices).

    The order is the uninterrupted run's: the sampler is seeded by (seed, epoch). Starting a
    DataLoader iterator draws a base seed from torch's global RNG; the uninterrupted run drew it at
    the start of the epoch, before the checkpoint's RNG state was taken, so a resumed iterator's draw
    is undone to keep the restored RNG stream identical.
    """
    train_loader.set_epoch(epoch)
    if skip <= 0:
        return iter(train_loader)
    loader = accelerator.skip_first_batches(train_loader, skip)
    loader.set_epoch(epoch)
    batches = iter(loader)
    state = torch.get_rng_state()
    first = next(batches)
    torch.set_rng_state(state)
    return itertools.chain([first], batches)


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain numbers (loadable with ``weights_only=True``)."""
    import numpy as np

    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": int(version),
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the whole trainer state of one run. ``save`` and ``resume`` are collective:
    every rank calls them at the same step."""

    def __init__(self, cfg, accelerator, backend, model, optimizer, scheduler):
        self.cfg, self.accelerator, self.backend = cfg, accelerator, backend
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.root = checkpoints_root(cfg.output_dir)
        self.last: str | None = None  # the newest complete checkpoint of this run (or the one resumed)

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every_steps
        return bool(every) and step % every == 0

    # --- save ------------------------------------------------------------------------------
    def save(self, state: TrainerState) -> str:
        final = os.path.join(self.root, checkpoint_name(state.step))
        tmp = os.path.join(self.root, TMP_PREFIX + checkpoint_name(state.step))
        started = time.perf_counter()
        faults.current_save_step[0] = state.step
        try:
            return self._save(state, final, tmp, started)
        finally:
            faults.current_save_step[0] = 0

    def _save(self, state: TrainerState, final: str, tmp: str, started: float) -> str:
        acc = self.accelerator
        error = None
        if acc.is_main_process:
            error = _attempt(lambda: self._make_dirs(tmp))
        self._agree_or_raise(error, tmp)

        # Collectives first (gathers), local writes after: a failed write cannot hang another rank.
        adapter = self.backend.adapter_state_dict(self.model)
        error = _attempt(lambda: self.backend.save_optimizer_state(self.model, self.optimizer, os.path.join(tmp, "optimizer")))
        if error is None:
            error = _attempt(lambda: storage.save_torch(rng_state(), os.path.join(tmp, "rng", f"rank-{acc.process_index:05d}.pt")))
        if error is None and acc.is_main_process:
            error = _attempt(lambda: self._write_main_files(tmp, adapter, state))
        faults.kill_during_checkpoint(state.step)
        self._agree_or_raise(error, tmp)

        if acc.is_main_process:
            error = _attempt(lambda: self._publish(tmp, final, state.step))
        self._agree_or_raise(error, tmp)
        self.last = final
        if acc.is_main_process:
            prune(self.cfg.output_dir, self.cfg.keep_last_checkpoints)
            logger.info("checkpoint %s written in %.1fs", final, time.perf_counter() - started)
        acc.wait_for_everyone()
        return final

    def _make_dirs(self, tmp: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("adapter", "optimizer", "rng"):
            os.makedirs(os.path.join(tmp, sub))

    def _write_main_files(self, tmp: str, adapter: dict, state: TrainerState) -> None:
        import yaml

        from .adapter import verify_adapter, write_peft_adapter
        from .model import expected_adapter_shapes

        peft_model = self.accelerator.unwrap_model(self.model)
        faults.disk_full(os.path.join(tmp, "adapter"))
        write_peft_adapter(peft_model, adapter, os.path.join(tmp, "adapter"))
        verify_adapter(os.path.join(tmp, "adapter"), expected_adapter_shapes(peft_model))
        storage.save_torch(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        storage.write_text(os.path.join(tmp, STATE_FILE), json.dumps({"format": FORMAT_VERSION, **asdict(state)}, indent=1))
        storage.write_text(os.path.join(tmp, "config.yaml"), yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _publish(self, tmp: str, final: str, step: int) -> None:
        storage.fsync_tree(tmp)
        if os.path.exists(final):  # e.g. written by an earlier attempt that this run resumed before
            old = os.path.join(self.root, f"{TMP_PREFIX}old-{checkpoint_name(step)}")
            shutil.rmtree(old, ignore_errors=True)
            if is_complete(final):
                os.remove(os.path.join(final, MARKER))
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        storage.fsync_dir(self.root)
        storage.write_text(os.path.join(final, MARKER), json.dumps({"step": step, "time": time.time()}) + "\n")
        storage.fsync_dir(final)

    def _agree_or_raise(self, error: str | None, tmp: str) -> None:
        """Every rank learns whether any rank failed; all raise the same clear error, the temporary
        directory is removed, and earlier checkpoints stay untouched."""
        acc = self.accelerator
        failed = acc.reduce(torch.tensor([1.0 if error else 0.0], device=acc.device), "sum").item() > 0
        if not failed:
            return
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        previous = f"the previous checkpoint {self.last} is intact" if self.last else "no earlier checkpoint exists"
        raise UserError(
            f"checkpoint: could not write {tmp} ({error or 'failed on another rank'}); {previous}; free disk space "
            f"or make {self.root} writable, then resume with resume_from: auto"
        )

    # --- load ------------------------------------------------------------------------------
    def resume(self, path: str, identity: dict, per_epoch_batches: int) -> TrainerState:
        """Restore adapter, optimizer, scheduler, GradScaler, RNG and the data position from ``path``."""
        acc = self.accelerator
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            saved = json.load(f)
        saved.pop("format", None)
        state = TrainerState(**saved)
        state = self._check_identity(path, state, identity, per_epoch_batches)

        tensors = self._read_adapter(path)
        self.backend.load_adapter_weights(self.model, tensors)
        self.backend.load_optimizer_state(self.model, self.optimizer, os.path.join(path, "optimizer"))
        self.scheduler.load_state_dict(storage.load_torch(os.path.join(path, "scheduler.pt")))
        # accelerate counts micro-batches for its accumulation boundary; windows always hold exactly
        # gradient_accumulation_steps of them, so the count is a multiple of it at every step boundary.
        acc.step = state.step * self.cfg.gradient_accumulation_steps
        rng_file = os.path.join(path, "rng", f"rank-{acc.process_index:05d}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(storage.load_torch(rng_file))
        else:  # another world size, forced: the ranks beyond the saved ones keep the seeded state
            logger.warning("no RNG state for rank %d in %s", acc.process_index, path)
        self.last = path
        if acc.is_main_process:
            remove_partial(self.cfg.output_dir)
        acc.wait_for_everyone()
        logger.info("resumed from %s: step %d, epoch %d, %d micro-batches of it already seen", path, state.step,
                    state.epoch, state.batches_in_epoch)
        return state

    def _read_adapter(self, path: str) -> dict[str, torch.Tensor]:
        """The checkpoint's adapter, keyed like the live model's trainable parameters."""
        from safetensors.torch import load_file

        from .adapter import ADAPTER_FILE
        from .model import expected_adapter_shapes

        peft_model = self.accelerator.unwrap_model(self.model)
        saved = load_file(os.path.join(path, "adapter", ADAPTER_FILE))
        expected = expected_adapter_shapes(peft_model)
        found = {k: tuple(v.shape) for k, v in saved.items()}
        if found != {k: tuple(v) for k, v in expected.items()}:
            raise UserError(f"resume_from: the adapter in {path} does not fit this run's model/lora settings "
                            f"(tensors or shapes differ); use the lora settings of that run or resume_from: null")
        marker = f".{getattr(peft_model, 'active_adapter', 'default')}."
        tensors = {}
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                name = storage.strip_wrapper_prefixes(name)
                tensors[name] = saved[name.replace(marker, ".")]
        return tensors

    def _check_identity(self, path, state: TrainerState, identity: dict, per_epoch_batches: int) -> TrainerState:
        saved = {**IDENTITY_ADDED_LATER, **state.identity}  # older checkpoints lack the keys added since
        differ = [k for k in identity if saved.get(k) != identity[k]]
        if not differ:
            state.identity = identity
            return state
        what = ", ".join(f"{k} {saved.get(k)} -> {identity[k]}" for k in differ)
        if not self.cfg.force_resume:
            raise UserError(
                f"resume_from: {path} was written with other settings ({what}); resuming would not continue the "
                f"same training exactly; restore them, or set force_resume: true to continue anyway"
            )
        # Forced: keep the epoch and convert the position by examples seen in it.
        old, new = state.identity, identity
        examples = state.batches_in_epoch * old.get("micro_batch_size", 1) * old.get("world_size", 1)
        gas = new["gradient_accumulation_steps"]
        batches = examples // (new["micro_batch_size"] * new["world_size"]) // gas * gas
        state.batches_in_epoch = batches if batches < per_epoch_batches else 0
        state.epoch += 0 if batches < per_epoch_batches else 1
        logger.warning("force_resume: %s; continuing at epoch %d, micro-batch %d (not an exact continuation)",
                       what, state.epoch, state.batches_in_epoch)
        state.identity = identity
        return state

    # --- stopping --------------------------------------------------------------------------
    def preempted(self, state: TrainerState, signum: int) -> RunStopped:
        """Save (collectively) and build the exception that ends the run with 128 + signal number."""
        done = self.last is not None and os.path.basename(self.last) == checkpoint_name(state.step)
        path = self.last if done else self.save(state)  # not twice when this step was a periodic save
        name = signal.Signals(signum).name
        return RunStopped(
            f"{name} received: checkpoint of step {state.step} written to {path}; resume with the same command "
            f"and resume_from: auto (e.g. --resume_from auto) or --resume_from {path}",
            exit_code_for_signal(signum),
            checkpoint=path,
        )


def _attempt(action) -> str | None:
    """Run a file-writing action; an OSError becomes its message (reported collectively)."""
    try:
        action()
        return None
    except OSError as e:
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
