"""What a resumed run continues from: the trainer state (step, data position, counters) and the run's identity
(every setting that defines it, compared on resume), the checkpoint's ``trainer_state.json`` and
``config.yaml`` read back, and the data position's iterator (``epoch_batches``). Builds on ``layout``."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field, fields

import torch

from .. import storage
from ..config import flatten_config
from .layout import STATE_FILE


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
    identity: dict = field(default_factory=dict)  # what must match for an exact continuation (run_identity)
    run_id: str = ""  # the run this state belongs to (set on the main process when the run's files start)

    def advance(self, micro_batches: int, per_epoch: int) -> None:
        """One optimizer step consumed ``micro_batches``; an epoch holds ``per_epoch`` of them."""
        self.step += 1
        self.batches_in_epoch += micro_batches
        if self.batches_in_epoch >= per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0


# Identity keys newer than some checkpoints, with the value every run had before the key existed. (Config
# settings added to the identity later need no entry: they are read from the checkpoint's config.yaml, and
# a config key the checkpoint's config.yaml predates counts with its default.)
IDENTITY_ADDED_LATER = {"packing": False, "group_by_length": False}

# The identity keys that decide which examples each step sees: what force_resume converts the data position by.
POSITION_KEYS = ("world_size", "micro_batch_size", "gradient_accumulation_steps", "seed", "packing", "group_by_length",
                 "train_examples", "train_target_tokens", "train_file_sha256")

# Config settings that say how and where the run computes, logs and saves, not what it trains: a resume takes
# them from the new config (and says which changed). Every other setting defines the run and must match its
# checkpoint (a setting added to the config later defines the run unless it is listed here).
RUNTIME_SETTINGS = ("trust_remote_code", "attn_implementation", "gradient_checkpointing",
                    "gradient_checkpointing_reentrant", "lm_head_targets_only", "train_file", "eval_file",
                    "output_dir", "overwrite_output_dir", "log_every_steps", "eval_every_steps", "report_to",
                    "num_workers", "peak_tflops", "checkpoint_every_steps", "keep_last_checkpoints", "resume_from",
                    "force_resume", "max_bad_steps")
STARTING_SETTINGS = ("resume_from", "force_resume", "overwrite_output_dir")  # how a run starts, not how it runs


def run_identity(cfg, world_size: int, train_data) -> dict:
    """Every setting that defines the run, as a flat dict: what decides which examples each step sees (the
    world size, batch shape, seed, and the training data by count and by content: the SHA-256 of train_file,
    so reordered or edited records count as other data), and every config setting of what is trained and how
    (model, LoRA, quantization, tokenization, schedule, optimizer). A resume with other values would not
    continue the same training: refused unless ``force_resume``."""
    return {
        "world_size": int(world_size),
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "seed": cfg.seed,
        "packing": cfg.packing,
        "group_by_length": cfg.group_by_length,
        "train_examples": len(train_data.dataset),
        "train_target_tokens": int(train_data.target_tokens),
        "train_file_sha256": _data_sha256(cfg.train_file),
        **defining_settings(cfg.to_dict()),
    }


_data_hashes: dict[tuple, str] = {}


def _data_sha256(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _data_hashes:
        _data_hashes[key] = storage.content_sha256(path)
    return _data_hashes[key]


def defining_settings(config: dict) -> dict:
    """The config settings that define the run (all but ``RUNTIME_SETTINGS``), flattened (``lora.alpha``), in the
    form they are compared in: a local model path made absolute, a chat template file by its content, and the
    settings a value elsewhere makes irrelevant left out (``num_epochs`` under ``max_steps``, ``warmup_ratio``
    under ``warmup_steps``)."""
    flat = flatten_config(config)
    out = {k: v for k, v in flat.items() if k not in RUNTIME_SETTINGS and k.split(".")[0] not in RUNTIME_SETTINGS}
    if out.get("max_steps"):
        out.pop("num_epochs", None)
    if out.get("warmup_steps"):
        out.pop("warmup_ratio", None)
    model = out.get("model")
    if isinstance(model, str) and os.path.isdir(os.path.expanduser(model)):
        out["model"] = os.path.abspath(os.path.expanduser(model))
    template = out.get("chat_template")
    if isinstance(template, str):
        out["chat_template"] = "sha256:" + (storage.sha256_file(template) if os.path.isfile(template)
                                            else hashlib.sha256(template.encode()).hexdigest())
    return out


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


def read_trainer_state(path: str) -> TrainerState:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        saved = json.load(f)
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in saved.items() if k in known})


def read_saved_config(path: str) -> dict | None:
    import yaml

    try:
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def runtime_changes(saved_config: dict | None, new_config: dict) -> list[tuple[str, object, object]]:
    """Run-time settings whose value differs from the checkpoint's config (the ones a resume always takes from
    the new config), without those that only say how to start (resume_from, force_resume, overwrite_output_dir)."""
    if saved_config is None:
        return []
    old, new = flatten_config(saved_config), flatten_config(new_config)
    keys = [k for k in RUNTIME_SETTINGS if k not in STARTING_SETTINGS]
    return [(k, old.get(k), new.get(k)) for k in keys if k in old and old.get(k) != new.get(k)]
