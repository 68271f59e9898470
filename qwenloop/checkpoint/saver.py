"""The ``Checkpointer``: saves one run's whole trainer state (collectively, atomically: a temporary directory,
the manifest last, one rename), and resumes from a checkpoint (verified, its settings compared with the run's,
adapter / optimizer / scheduler / RNG / data position restored). Builds on ``layout``, ``state`` and ``rng``;
only the package's ``__init__`` imports it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass

import torch

from .. import faults, storage
from ..agreement import any_rank
from ..errors import RunStopped, UserError, exit_code_for_signal
from .layout import (FORMAT_VERSION, MARKER, STATE_FILE, TMP_PREFIX, Verdict, checkpoint_name, checkpoints_root,
                     is_complete, prune, remove_partial, verify_checkpoint, write_manifest)
from .rng import rng_state, set_rng_state
from .state import (IDENTITY_ADDED_LATER, POSITION_KEYS, RUNTIME_SETTINGS, STARTING_SETTINGS, TrainerState,
                    defining_settings, read_saved_config, read_trainer_state, runtime_changes)

logger = logging.getLogger("qwenloop")


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
        failure = None
        if acc.is_main_process:
            failure = _attempt(lambda: self._make_dirs(tmp), tmp)
        self._agree_or_raise(failure, tmp)

        # Collectives first (gathers), local writes after: a failed write cannot hang another rank.
        adapter = self.backend.adapter_state_dict(self.model)
        optimizer_dir, rng_file = os.path.join(tmp, "optimizer"), os.path.join(tmp, "rng", f"rank-{acc.process_index:05d}.pt")
        failure = _attempt(lambda: self.backend.save_optimizer_state(self.model, self.optimizer, optimizer_dir), tmp)
        if failure is None:
            failure = _attempt(lambda: storage.save_torch(rng_state(), rng_file), tmp)
        if failure is None and acc.is_main_process:
            failure = _attempt(lambda: self._write_main_files(tmp, adapter, state), tmp)
        faults.kill_during_checkpoint(state.step)
        faults.signal_during_checkpoint(state.step)
        self._agree_or_raise(failure, tmp)

        if acc.is_main_process:  # every rank's files are in place: the manifest, then the rename
            failure = _attempt(lambda: self._publish(tmp, final, state), tmp)
        self._agree_or_raise(failure, tmp)
        self.last = final
        if acc.is_main_process:
            prune(self.cfg.output_dir, self.cfg.keep_last_checkpoints, run_id=state.run_id or None)
            logger.info("checkpoint %s written in %.1fs", final, time.perf_counter() - started)
        acc.wait_for_everyone()
        return final

    def _make_dirs(self, tmp: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("adapter", "optimizer", "rng"):
            os.makedirs(os.path.join(tmp, sub))

    def _write_main_files(self, tmp: str, adapter: dict, state: TrainerState) -> None:
        import yaml

        from ..adapter import ADAPTER_FILE, verify_adapter, write_peft_adapter
        from ..model import expected_adapter_shapes

        peft_model = self.accelerator.unwrap_model(self.model)
        faults.disk_full(os.path.join(tmp, "adapter"))
        with storage.writing(os.path.join(tmp, "adapter", ADAPTER_FILE)):  # safetensors' errors name no file
            write_peft_adapter(peft_model, adapter, os.path.join(tmp, "adapter"))
        verify_adapter(os.path.join(tmp, "adapter"), expected_adapter_shapes(peft_model))
        storage.save_torch(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        storage.write_text(os.path.join(tmp, STATE_FILE), json.dumps({"format": FORMAT_VERSION, **asdict(state)}, indent=1))
        storage.write_text(os.path.join(tmp, "config.yaml"), yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _publish(self, tmp: str, final: str, state: TrainerState) -> None:
        """Manifest into the temporary directory, everything fsynced, then one rename: the step directory
        appears complete, or not at all."""
        write_manifest(tmp, state.step, state.run_id)
        storage.fsync_tree(tmp)
        old = None
        if os.path.exists(final):  # e.g. written by an earlier attempt that this run resumed before
            old = os.path.join(self.root, f"{TMP_PREFIX}old-{checkpoint_name(state.step)}")
            shutil.rmtree(old, ignore_errors=True)
            if is_complete(final):
                os.remove(os.path.join(final, MARKER))
            os.replace(final, old)
        os.replace(tmp, final)
        storage.fsync_dir(self.root)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def _agree_or_raise(self, failure: "_Failure | None", tmp: str) -> None:
        """Every rank learns whether any rank failed; the temporary directory is removed and earlier
        checkpoints stay untouched. A storage failure ends every rank with the same one-line error; anything
        else is a bug, raised with its traceback where it happened."""
        acc = self.accelerator
        if not any_rank(acc, failure is not None):
            return
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        if failure is not None and failure.bug is not None:
            raise failure.bug
        previous = f"the previous checkpoint {self.last} is intact" if self.last else "no earlier checkpoint exists"
        name = os.path.basename(tmp).removeprefix(TMP_PREFIX)
        raise UserError(
            f"checkpoint: could not write {name} ({failure.message if failure else 'failed on another rank'}); {previous}; "
            f"free disk space or make {self.root} writable, then resume with resume_from: auto"
        )

    # --- load ------------------------------------------------------------------------------
    def resume(self, path: str, identity: dict, per_epoch_batches: int) -> TrainerState:
        """Restore adapter, optimizer, scheduler, GradScaler, RNG and the data position from ``path``, after
        verifying its files and comparing every setting that defines the run with the checkpoint's."""
        acc = self.accelerator
        verdict = verify_checkpoint(path)
        if verdict.problem:
            raise UserError(f"resume_from: {path} cannot be resumed from: {verdict.problem}; use resume_from: auto "
                            f"(the newest checkpoint that verifies) or point it at an earlier checkpoint")
        state = read_trainer_state(path)
        saved_world = int(state.identity.get("world_size", 1))
        saved_config = read_saved_config(path)
        forced = self._check_identity(path, state, identity, per_epoch_batches, saved_config)
        try:
            self._restore(path, state)
        except Exception as e:
            if not verdict.legacy:
                raise  # verified files that do not load: a bug, with its traceback
            raise UserError(f"resume_from: {path} could not be read back ({type(e).__name__}: {str(e)[:200]}); it was "
                            f"written before checkpoints carried checksums and is damaged; point resume_from at an "
                            f"earlier checkpoint") from e
        if forced:
            self._apply_new_optimizer_settings()
        self._restore_rng(path, saved_world)
        self.last = path
        if acc.is_main_process:
            remove_partial(self.cfg.output_dir)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._log_resume(path, state, forced, saved_config, verdict)
        return state

    def _restore(self, path: str, state: TrainerState) -> None:
        tensors = self._read_adapter(path)
        self.backend.load_adapter_weights(self.model, tensors)
        self.backend.load_optimizer_state(self.model, self.optimizer, os.path.join(path, "optimizer"))
        self.scheduler.load_state_dict(storage.load_torch(os.path.join(path, "scheduler.pt")))
        # accelerate counts micro-batches for its accumulation boundary; windows always hold exactly
        # gradient_accumulation_steps of them, so the count is a multiple of it at every step boundary.
        self.accelerator.step = state.step * self.cfg.gradient_accumulation_steps

    def _restore_rng(self, path: str, saved_world: int) -> None:
        rank = self.accelerator.process_index
        rng_file = os.path.join(path, "rng", f"rank-{rank:05d}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(storage.load_torch(rng_file))
        elif rank >= saved_world:  # another world size, forced: the ranks beyond the saved ones keep the seeded state
            logger.warning("no RNG state for rank %d in %s (written by %d processes): it keeps its seeded state",
                           rank, path, saved_world)
        else:  # verification found it; gone since: the resume would not be exact
            raise UserError(f"resume_from: {rng_file} is missing; point resume_from at an earlier checkpoint")

    def _read_adapter(self, path: str) -> dict[str, torch.Tensor]:
        """The checkpoint's adapter, keyed like the live model's trainable parameters."""
        from safetensors.torch import load_file

        from ..adapter import ADAPTER_FILE
        from ..model import expected_adapter_shapes

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

    def _check_identity(self, path, state: TrainerState, identity: dict, per_epoch_batches: int,
                        saved_config: dict | None) -> list[tuple[str, object, object]]:
        """Refuse a resume whose settings differ from the checkpoint's (each named, old -> new) unless
        ``force_resume``; forced, convert the data position and return the differences (the new values apply)."""
        saved, unknown = self._saved_identity(state.identity, saved_config, identity)
        if unknown and self.accelerator.is_main_process:
            logger.warning("resume: %s was written before %s were recorded: not compared (the training data was "
                           "compared by its example and target-token counts only)", path, ", ".join(unknown))
        differ = [(k, saved[k], identity[k]) for k in identity if k in saved and saved[k] != identity[k]]
        if not differ:
            state.identity = identity
            return []
        what = ", ".join(f"{k} {_shown(old)} -> {_shown(new)}" for k, old, new in differ)
        if not self.cfg.force_resume:
            raise UserError(
                f"resume_from: {path} was written with other settings ({what}); resuming would not continue the "
                f"same training exactly; restore them, or set force_resume: true to continue anyway with the new values"
            )
        if any(k in POSITION_KEYS for k, _, _ in differ):
            # Keep the epoch and convert the position by examples seen in it.
            examples = state.batches_in_epoch * saved.get("micro_batch_size", 1) * saved.get("world_size", 1)
            gas = identity["gradient_accumulation_steps"]
            batches = examples // (identity["micro_batch_size"] * identity["world_size"]) // gas * gas
            state.batches_in_epoch = batches if batches < per_epoch_batches else 0
            state.epoch += 0 if batches < per_epoch_batches else 1
        state.identity = identity
        return differ

    def _saved_identity(self, recorded: dict, saved_config: dict | None, identity: dict) -> tuple[dict, list[str]]:
        """The checkpoint's identity, completed for checkpoints older than some of its keys: config settings
        from the checkpoint's config.yaml (a key it predates counts with its default), other keys from
        ``IDENTITY_ADDED_LATER``. Returns it and the keys still unknown."""
        saved = {}
        if saved_config is not None:
            saved.update(defining_settings(_deep_merge(type(self.cfg)().to_dict(), saved_config)))
        saved.update(IDENTITY_ADDED_LATER)
        saved.update(recorded)
        return saved, [k for k in identity if k not in saved]

    def _apply_new_optimizer_settings(self) -> None:
        """Forced over changed settings: the optimizer's hyperparameters and the LR schedule are the new
        config's (the checkpoint's were restored with its state), evaluated at the checkpoint's step."""
        cfg, scheduler = self.cfg, self.scheduler
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [cfg.learning_rate for _ in scheduler.base_lrs]
        for group, base in zip(groups, scheduler.base_lrs):
            group["initial_lr"] = base
            group["betas"] = tuple(cfg.adam_betas)
            group["weight_decay"] = cfg.weight_decay
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas:  # LambdaLR (every schedule transformers builds): the new schedule's rate at this step
            rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
            for group, rate in zip(groups, rates):
                group["lr"] = rate
            scheduler._last_lr = rates

    def _log_resume(self, path: str, state: TrainerState, forced: list, saved_config: dict | None, verdict: Verdict) -> None:
        logger.info("resumed from %s: step %d, epoch %d, %d micro-batches of it already seen", path, state.step,
                    state.epoch, state.batches_in_epoch)
        if verdict.legacy:
            logger.warning("resume: %s was written before checkpoints carried checksums: its files were checked to be "
                           "there, not that they are intact", path)
        runtime = runtime_changes(saved_config, self.cfg.to_dict())
        from_config = ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, a, b in runtime) or "none changed"
        if forced:
            logger.warning("force_resume: the new config's values apply from step %d (not an exact continuation): %s; "
                           "from the checkpoint: the adapter weights, optimizer moments, step and data position%s",
                           state.step, ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, a, b in forced),
                           "" if any(k in POSITION_KEYS for k, _, _ in forced) else ", RNG states")
        else:
            logger.info("resume: from the checkpoint: the adapter weights, optimizer state, LR schedule and its position, "
                        "data position and RNG states; every setting that defines the run (%d recorded, the training "
                        "data's content included) equals the checkpoint's", len(state.identity))
        logger.info("resume: from the new config: the run-time settings (%s); changed: %s",
                    ", ".join(k for k in RUNTIME_SETTINGS if k not in STARTING_SETTINGS), from_config)

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


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _shown(value) -> str:
    """A value in a message: hashes shortened, strings as they are."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19] + "…"
    return str(value)


@dataclass
class _Failure:
    message: str  # one line: what failed and why
    bug: BaseException | None = None  # not the storage's fault: re-raised as it is, with its traceback


def _attempt(action, path: str | None = None) -> _Failure | None:
    """Run a file-writing action. A failure of the storage (disk full, quota, unwritable; whichever library
    raised it) becomes its message, reported collectively; anything else is kept to be re-raised once every
    rank knows (a rank that raised alone would leave the others waiting in a collective)."""
    try:
        action()
        return None
    except Exception as e:  # noqa: BLE001 - classified right below; bugs are re-raised by _agree_or_raise
        why = storage.write_failure(e, path)
        return _Failure(why) if why else _Failure(f"{type(e).__name__}: {e}", e)
