"""Trainer state on disk: resumable checkpoints, written atomically, verified, found, loaded back, pruned; and
the output directory holding one run at a time.

``output_dir/checkpoints/step-0000042/``::

    adapter/              adapter_model.safetensors + adapter_config.json (PEFT format, adapter.py's writer)
    optimizer/            the backend's optimizer state: one file (single/DDP/FSDP), or one ZeRO-3 partition
                          per rank; the fp16 GradScaler's state next to it
    scheduler.pt          the LR scheduler's state_dict
    rng/rank-NNNNN.pt     python / numpy / torch (/cuda) RNG states of every rank
    trainer_state.json    step, data position (epoch, micro-batches consumed in it, sampler seed), the run's
                          id, every setting that defines the run (``run_identity``), tokens seen, NaN-sentinel
                          counters
    config.yaml           the training config used
    COMPLETE              the manifest, written last: the run's id and every other file's size and SHA-256

The frozen base is never in a checkpoint: only trainable parameters and their optimizer state.
Tensors are written with safetensors / ``torch.save`` and read back with ``weights_only=True``.

Atomicity: everything is written into ``checkpoints/.tmp-step-NNNNNNN`` (the manifest last), fsynced, and
renamed to ``step-NNNNNNN``: a step directory exists complete or not at all. Retention deletes older
checkpoints of the same run only once the new one is complete. A failed write (disk full in whichever library
wrote, unwritable directory) removes the temporary directory, leaves every earlier checkpoint as it was, and
raises ``UserError`` on every rank.

Verification: before a checkpoint is resumed from, every file the manifest lists is checked (size, SHA-256);
``resume_from: auto`` takes the newest checkpoint that verifies and says which it skipped and why, an explicit
path that fails is an error. Checkpoints written before manifests existed (a ``COMPLETE`` without ``files``)
are checked for their files' presence only, with a warning.

One run per directory: a fresh run writes ``output_dir/run_id.json`` (a new id) and stamps the id on its
checkpoints; ``auto`` and retention ignore checkpoints of another run. A run that replaces the previous one
(``overwrite_output_dir``) first moves every file of it to ``output_dir/replaced/<time>/``: nothing is
deleted, and nothing of the old run can be taken for the new one's.

Files are written through ``storage`` (fsynced; ``weights_only`` loads); the test-only fault hooks
(``QWENLOOP_FAULT``) are in ``faults``, preemption signals in ``signals``.

The package, importing in one direction (``saver`` -> ``state``, ``rng``, ``layout``; ``runs`` -> ``layout``;
``state`` -> ``layout``)::

    layout.py   checkpoints on disk: names, finding, manifest, verification, retention, partial cleanup
    runs.py     the run in output_dir: run ids, moving a replaced run aside, which checkpoint a run resumes
                (``resolve_resume``, ``choose_auto``), ``check_output_dir``
    state.py    ``TrainerState``, the run's identity (``run_identity``, ``defining_settings``), the
                checkpoint's trainer_state.json / config.yaml read back, ``epoch_batches``
    rng.py      every rank's RNG states
    saver.py    ``Checkpointer``: save (collective, atomic), resume (verified, identity compared), preemption

Only this ``__init__`` imports ``saver``; the rest of qwenloop imports ``checkpoint`` (the names below).
"""

from .layout import (CHECKPOINTS, FORMAT_VERSION, MARKER, STATE_FILE, TMP_PREFIX, Verdict, checkpoint_name,
                     checkpoint_run_id, checkpoints_root, find_latest, is_complete, list_checkpoints,
                     newest_resumable, prune, read_manifest, remove_partial, verify_checkpoint, write_manifest)
from .rng import rng_state, set_rng_state
from .runs import (COPIED_ENTRIES, FINISHED_ENTRIES, MOVED_ENTRIES, REPLACED, RUN_ENTRIES, RUN_ID_FILE, AutoChoice,
                   PreviousRun, check_output_dir, choose_auto, current_run_id, move_run_aside, new_run_id,
                   previous_run, previous_run_problem, resolve_resume, write_run_id)
from .saver import Checkpointer
from .state import (IDENTITY_ADDED_LATER, POSITION_KEYS, RUNTIME_SETTINGS, STARTING_SETTINGS, TrainerState,
                    defining_settings, epoch_batches, read_trainer_state, run_identity)

__all__ = [
    # layout
    "CHECKPOINTS", "FORMAT_VERSION", "MARKER", "STATE_FILE", "TMP_PREFIX", "Verdict", "checkpoint_name",
    "checkpoint_run_id", "checkpoints_root", "find_latest", "is_complete", "list_checkpoints", "newest_resumable",
    "prune", "read_manifest", "remove_partial", "verify_checkpoint", "write_manifest",
    # rng
    "rng_state", "set_rng_state",
    # runs
    "COPIED_ENTRIES", "FINISHED_ENTRIES", "MOVED_ENTRIES", "REPLACED", "RUN_ENTRIES", "RUN_ID_FILE", "AutoChoice",
    "PreviousRun", "check_output_dir", "choose_auto", "current_run_id", "move_run_aside", "new_run_id",
    "previous_run", "previous_run_problem", "resolve_resume", "write_run_id",
    # saver
    "Checkpointer",
    # state
    "IDENTITY_ADDED_LATER", "POSITION_KEYS", "RUNTIME_SETTINGS", "STARTING_SETTINGS", "TrainerState",
    "defining_settings", "epoch_batches", "read_trainer_state", "run_identity",
]
