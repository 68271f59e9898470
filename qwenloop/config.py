"""The training config: *what* to train (model, data, LoRA, quantization, schedule, output).

*Where and how* to run (backend, precision, number of processes) belongs to the accelerate config
file and is never set here: the loop reads precision from the ``Accelerator``.

A config is a YAML file (read with a ``yaml.SafeLoader``) plus ``--key value`` command-line overrides,
nested groups addressed with a dot (``--lora.r 16``). Every field is typed and documented below; the
README's config reference is checked against these docstrings by a test.

Reading that text into these classes (each value by its field's type, not by YAML's guesses) is
``qwenloop.config_text``'s; its public names are importable from here too.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from .config_text import build_config, dataclass_type, expand_home, load_yaml_text, parse_overrides, read_config_file
from .errors import UserError

__all__ = ["QWEN_LORA_TARGETS", "PATH", "LoraSettings", "QuantizationSettings", "TrainConfig", "field_docs",
           "flatten_config", "expand_home", "load_yaml_text", "parse_overrides"]

QWEN_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PATH = {"path": True}
"""Field metadata of the fields naming a file or directory: ``~`` is expanded in them (``TrainConfig.__post_init__``)."""


@dataclass
class LoraSettings:
    """LoRA adapter (PEFT). Defaults follow the QLoRA paper's advice for Qwen: adapt every linear
    projection of attention and MLP."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by alpha / r (at least 1: with 0 nothing trains)."""
    dropout: float = 0.05
    """Dropout applied to the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(QWEN_LORA_TARGETS))
    """Module name suffixes to adapt; every entry must match at least one module of the model."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train (PEFT's `bias`)."""


@dataclass
class QuantizationSettings:
    """Base weights quantized by bitsandbytes; the LoRA adapter stays in full precision."""

    bits: Literal[0, 4, 8] = 0
    """0: no quantization; 4: QLoRA (NF4 by default); 8: LLM.int8 (single process / DDP only)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit per parameter)."""


@dataclass
class TrainConfig:
    """Everything about one fine-tuning run except the hardware (that is the accelerate config)."""

    # --- model -------------------------------------------------------------------------------
    model: str = field(default="", metadata=PATH)
    """Local directory or hub id of a Qwen2 / Qwen2.5 / Qwen3 causal LM (hub only where a network exists)."""
    trust_remote_code: bool = False
    """Allow code shipped with the model to run. Off unless you trust the model repository."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel; `sdpa` falls back to `eager` when the model does not support it. sdpa and eager
    run everywhere (V100 included) and keep packed examples apart with a block-causal mask;
    `flash_attention_2` (Ampere+, the flash-attn package; varlen kernels for packing, one row per
    micro-batch) and `flex_attention` (GPU only: no backward on CPU) are for GPUs that have them."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (needed for long sequences on big models)."""
    gradient_checkpointing_reentrant: bool = False
    """Use torch's reentrant checkpointing (older behaviour); non-reentrant is the default and safer."""
    lm_head_targets_only: bool = True
    """Run the LM head and the fp32 cross-entropy only on positions whose next token is a target, in
    chunks, never building the full [tokens x vocab] logits or their gradient (`qwenloop/loss.py`).
    Off: full logits, reduced in chunks (kept for comparison and for LoRA on `lm_head`)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter settings."""
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    """bitsandbytes quantization of the frozen base."""

    # --- data --------------------------------------------------------------------------------
    train_file: str = field(default="", metadata=PATH)
    """JSONL / JSON / parquet file, or a directory written by `datasets.Dataset.save_to_disk`."""
    eval_file: Optional[str] = field(default=None, metadata=PATH)
    """Optional held-out file in the same formats; evaluated every `eval_every_steps` and at the end."""
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"
    """Record format: `messages` (role/content), `sharegpt` (conversations/from/value), `alpaca`
    (instruction/input/output); `auto` detects it from each record's keys (a file may mix them)."""
    chat_template: Optional[str] = field(default=None, metadata=PATH)
    """Jinja chat template replacing the tokenizer's, or the path of a file holding one (a value without a
    `{{`, `{%` or `{#` tag is a path, and the file must exist); when neither is set and the tokenizer has
    none but has Qwen's ChatML tokens, Qwen's template is used."""
    train_on_prompt: bool = False
    """Also compute the loss on system/user tokens (default: assistant turns only)."""
    max_seq_len: int = 2048
    """Longest tokenized example, in tokens."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with longer examples: cut them to `max_seq_len`, or leave them out. Both are counted in the log."""
    bad_records: Literal["error", "skip"] = "error"
    """Records that cannot be used (malformed JSON, no assistant turn, an unknown role, ...): `error` stops before
    training with a report of every one (`file:line: what is wrong`); `skip` leaves them out, logs the same report
    once and counts them in `run.json`, but still refuses a file where none is left."""
    packing: bool = False
    """Pack several examples into each row of up to `max_seq_len` tokens (best-fit decreasing), with
    positions restarting per example and attention that cannot cross an example boundary; removes
    padding. `micro_batch_size` then counts rows."""
    group_by_length: bool = False
    """Without packing: put examples of similar length in the same micro-batch (less padding); the
    batches are still shuffled, by `seed` and epoch."""

    # --- schedule ----------------------------------------------------------------------------
    num_epochs: int = 1
    """Passes over the training data (ignored when `max_steps` > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means `num_epochs` epochs."""
    micro_batch_size: int = 1
    """Examples per forward pass on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each process. Global batch = micro x accumulation x processes."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps; when 0, `warmup_ratio` of the total steps is used."""
    warmup_ratio: float = 0.03
    """Fraction of the total steps used for warmup when `warmup_steps` is 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (finite); 0 disables clipping."""
    seed: int = 42
    """Seed for weights of the adapter, dropout and data order (the same on every process); 0 to 4294967295 (2^32 - 1)."""

    # --- output and logging -----------------------------------------------------------------
    output_dir: str = field(default="outputs/run", metadata=PATH)
    """Where the adapter (`adapter/`), `metrics.jsonl` and the config used are written."""
    overwrite_output_dir: bool = False
    """Allow training into an `output_dir` that already holds a previous run: its files (metrics, adapter,
    checkpoints, run.json) are moved to `output_dir/replaced/<time>/` first, never deleted."""
    log_every_steps: int = 1
    """Write a metrics line every N optimizer steps."""
    eval_every_steps: int = 0
    """Evaluate on `eval_file` every N optimizer steps (0: only at the end)."""
    report_to: list[str] = field(default_factory=list)
    """Accelerate trackers to log to as well, e.g. [tensorboard]."""
    num_workers: int = 0
    """DataLoader worker processes."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOPS of one accelerator in the run's precision, for the `mfu` metric; when null it is
    looked up from the GPU's name (`qwenloop/flops.py`), and no MFU is reported on a CPU."""

    # --- checkpoints, resume, failures --------------------------------------------------------
    checkpoint_every_steps: int = 0
    """Write a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) to
    `output_dir/checkpoints/step-NNNNNNN/` every N optimizer steps; 0: only when stopped by SIGTERM/SIGINT."""
    keep_last_checkpoints: int = 2
    """How many complete checkpoints to keep; older ones are deleted once a newer one is complete (0: keep all)."""
    resume_from: Optional[str] = field(default=None, metadata=PATH)
    """`auto`: continue from the newest checkpoint of this run in `output_dir` that verifies against its
    manifest (skipped ones are named), start fresh when there is none, refuse a finished run; a path: that
    checkpoint directory (it must verify); null: start from scratch."""
    force_resume: bool = False
    """Resume even when settings that define the run differ from the checkpoint's (each is named, old -> new):
    the new values apply from the checkpoint's step (learning rate, schedule, max_steps...); with another
    batch size, world size, seed or data the position is converted by examples seen, and the run is no longer
    an exact continuation."""
    max_bad_steps: int = 10
    """Stop the run after this many consecutive optimizer steps with a non-finite loss or gradient norm
    (each such step is skipped and counted); 0: never stop."""

    def __post_init__(self):
        # `~` is the shell's shorthand, not the filesystem's: a YAML file or a quoted override reaches us
        # unexpanded, and os.makedirs("~/runs/x") would create a directory literally named `~` here.
        for f in fields(self):
            if f.metadata.get("path"):
                setattr(self, f.name, expand_home(getattr(self, f.name)))

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None, validate: bool = True) -> "TrainConfig":
        """Read a YAML file, apply ``--key value`` overrides, validate (``validate=False``: types only, for a
        caller that reports every problem itself, as ``qwenloop doctor`` does)."""
        path = os.fspath(path)
        return cls.from_dict(read_config_file(path), overrides=overrides, source=path, validate=validate)

    @classmethod
    def from_dict(cls, raw: dict, overrides: list[str] | None = None, source: str = "config",
                  validate: bool = True) -> "TrainConfig":
        cfg = build_config(cls, raw, overrides, source)
        if validate:
            cfg.validate(source)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config") -> None:
        """Raise the first problem the training config's checks find (``qwenloop.checks.training``: the same
        rules ``qwenloop doctor`` lists all at once and ``train()`` runs again before loading)."""
        from .checks.training import config_problems

        problems = config_problems(self, source)
        if problems:
            raise UserError(problems[0])


def field_docs(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every field, nested groups flattened with dots.

    The docstrings under each field are read from the source, so the README reference and the
    dataclass cannot drift apart (a test compares them).
    """
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        sub = dataclass_type(hints[f.name])
        if sub is not None:
            rows.extend(field_docs(sub, prefix + f.name + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name = _type_name(hints[f.name])
        rows.append((prefix + f.name, type_name, repr(default) if default != "" else '""', docs.get(f.name, "")))
    return rows


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " / ".join(str(a) for a in args)  # no "|": the reference is a Markdown table
    if origin in (Union, types.UnionType):
        return " / ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def flatten_config(d: dict, prefix: str = "") -> dict:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``: the dotted keys of the command line (``--lora.r 8``), for
    comparing two configs key by key and for trackers' flat hyperparameter tables."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out
