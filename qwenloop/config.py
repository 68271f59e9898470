"""The training config: *what* to train (model, data, LoRA, quantization, schedule, output).

*Where and how* to run (backend, precision, number of processes) belongs to the accelerate config
file and is never set here: the loop reads precision from the ``Accelerator``.

A config is a YAML file (read with a ``yaml.SafeLoader``) plus ``--key value`` command-line overrides,
nested groups addressed with a dot (``--lora.r 16``). Every field is typed and documented below; the
README's config reference is checked against these docstrings by a test.

A value the user typed (an unquoted YAML scalar, a command-line value) is read by its field's type, not
by YAML's guesses: YAML 1.1 reads ``12:30`` as 750 (base 60), ``0777`` as 511 (octal) and ``2024_01`` as
202401, which would silently rename an ``output_dir``. A ``str`` field takes the text as written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

import yaml

from .chat_template import is_template_text
from .errors import UserError

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
        if not os.path.isfile(path):
            raise UserError(f"{path}: config file not found; pass the path of a YAML training config")
        raw = load_yaml_text(_read_utf8(path), path)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            kind = "text" if isinstance(raw, str) else f"a {type(raw).__name__}"
            raise UserError(f"{path}: the top level must be a mapping of config keys, got {kind}")
        return cls.from_dict(raw, overrides=overrides, source=path, validate=validate)

    @classmethod
    def from_dict(cls, raw: dict, overrides: list[str] | None = None, source: str = "config",
                  validate: bool = True) -> "TrainConfig":
        data = _deep_copy(raw)
        for dotted, value in parse_overrides(overrides or []):
            _set_dotted(cls, data, dotted, value)
        cfg = _build(cls, data, source, prefix="")
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


def expand_home(value: Any) -> Any:
    """A path field's value with a leading ``~`` / ``~user`` expanded (a path object becomes its string);
    a Jinja chat template and anything that is not a path are returned as they are."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value.startswith("~") and not is_template_text(value):
        return os.path.expanduser(value)
    return value


# --------------------------------------------------------------------------------------------
# reading the YAML file
# --------------------------------------------------------------------------------------------


class _Text(str):
    """A value as the user typed it: an unquoted YAML scalar, or a command-line value. ``_coerce`` reads it
    by the type of the field it lands in; a quoted YAML scalar is a plain ``str`` (the user said: text)."""


_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that keeps every unquoted scalar as the text written (a ``_Text``), except null."""

    def construct_object(self, node, deep=False):
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag != _NULL_TAG:
            return _Text(node.value)
        return super().construct_object(node, deep=deep)


def _read_utf8(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror}); check its permissions")
    try:
        return data.decode("utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte offset {e.start}: 0x{data[e.start]:02x}); "
                        f"save the file as UTF-8") from None


def load_yaml_text(text: str, source: str) -> Any:
    """Parse one YAML document (``yaml.SafeLoader`` rules, unquoted scalars kept as ``_Text``), refusing
    duplicate keys, which YAML would resolve silently to the last one."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); fix the syntax")
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, source: str, prefix: str = "", seen_nodes: set | None = None) -> None:
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: already checked (and it may point at itself)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, source, prefix, seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG else None
        line = key_node.start_mark.line + 1
        if name in first_line:
            raise UserError(f"{source}:{line}: key {prefix + name!r} is set twice (first at line {first_line[name]}), "
                            f"and YAML would silently keep only the last; delete one of them")
        if name is not None:
            first_line[name] = line
        _refuse_duplicate_keys(value_node, source, f"{prefix}{name}." if name is not None else prefix, seen_nodes)


# --------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``["--lora.r", "16", "--max_steps=3"]`` -> ``[("lora.r", "16"), ("max_steps", "3")]``.

    Each value stays the text given (a ``_Text``); the field's type reads it later (``_coerce``), so
    ``--output_dir 12:30`` is the directory ``12:30``, ``--max_steps abc`` is an error, and a list is
    written as a YAML flow list (``--lora.target_modules "[q_proj, v_proj]"``).
    """
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"command line: --{key} needs a value (e.g. --{key} 3)")
            text = argv[i + 1]
            i += 2
        out.append((key.replace("-", "_"), _Text(text)))
    return out


def _set_dotted(cls: type, data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, node_cls, prefix = data, cls, ""
    for i, part in enumerate(parts):
        names = {f.name: f for f in fields(node_cls)}
        if part not in names:
            raise UserError(f"command line: --{dotted}: unknown key {prefix + part!r}{_suggest(part, names, prefix)}")
        sub_cls = _dataclass_type(names[part].type)
        if i == len(parts) - 1:
            if sub_cls is not None and isinstance(value, _Text):  # a whole group: --lora "{r: 8, alpha: 16}"
                value = load_yaml_text(value, f"command line: --{dotted}")
            node[part] = value
            return
        if sub_cls is None:
            raise UserError(f"command line: --{dotted}: {prefix + part!r} is not a group of settings")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, node_cls, prefix = child, sub_cls, prefix + part + "."


# --------------------------------------------------------------------------------------------
# typed construction
# --------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise UserError(f"{source}: {where}: expected a mapping, got {data!r}")
    names = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"{source}: unknown key {prefix + str(key)!r}{_suggest(str(key), names, prefix)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        if sub is not None:
            kwargs[name] = _build(sub, value, source, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, hints[name], source, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, _Text) and value in _NULL_WORDS)):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], source, key)
    if origin is Literal:
        if isinstance(value, _Text):  # `4` for quantization.bits: the choice whose text it is
            value = next((a for a in args if str(a) == value), str(value))
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UserError(f"{source}: {key}: {value!r} is not one of {choices}{extra}")
        return value
    if origin is list:
        if isinstance(value, _Text):
            value = _list_from_text(value, source, key)
        if isinstance(value, (str, int, float)):
            value = [value]  # `--report_to tensorboard` means a list of one
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, _Text):
            value = _YAML_BOOLS.get(value.lower(), str(value))
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, _Text):
            value = _int_from_text(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{source}: {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            value = _float_from_text(value)  # also a quoted `2e-4` (YAML 1.1 reads it as a string)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{source}: {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # a _Text becomes a plain str: the text as written
        raise UserError(f"{source}: {key}: expected a string, got {value!r}")
    return value


_NULL_WORDS = ("null", "Null", "NULL", "~")
"""Command-line spellings of null for an optional field (YAML's; an unquoted YAML null never becomes text)."""

_YAML_BOOLS = {word: value for value, words in ((True, ("true", "yes", "on")), (False, ("false", "no", "off")))
               for word in words}

_DECIMAL = re.compile(r"[-+]?[0-9][0-9_]*")

_YAML_FLOATS = {".nan": math.nan, ".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf}


def _int_from_text(text: str) -> int | float | str:
    """Decimal, as written (``0777`` is 777, not YAML 1.1's octal 511; ``12:30`` is no number, not 750);
    otherwise a number with an integral value (``1e3``). The text itself when neither (the caller says so)."""
    if _DECIMAL.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # `1__0`
            return str(text)
    number = _float_from_text(text)
    return number if isinstance(number, float) and math.isfinite(number) else str(text)


def _float_from_text(text: str) -> float | str:
    """Python's float syntax (``2e-4``, ``1_000.5``, ``nan``) or YAML's ``.nan`` / ``.inf``; NaN and infinity
    are read, and refused by the range checks of the fields where they mean nothing. The text when neither."""
    special = _YAML_FLOATS.get(text.lower())
    if special is not None:
        return special
    try:
        return float(text)
    except ValueError:
        return str(text)


def _list_from_text(text: str, source: str, key: str) -> Any:
    """A YAML flow list (``[q_proj, "v proj"]``, items kept as typed) or, without brackets, the text itself."""
    if not text.lstrip().startswith("["):
        return text
    try:
        value = load_yaml_text(text, "")
    except UserError:
        value = None
    if not isinstance(value, list):
        raise UserError(f"{source}: {key}: {str(text)!r} is not a list; write it as [a, b] (quote an item "
                        f"that holds a comma, a bracket or a colon)")
    return value


def _dataclass_type(tp: Any) -> type | None:
    if isinstance(tp, str):
        tp = {"LoraSettings": LoraSettings, "QuantizationSettings": QuantizationSettings}.get(tp, tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _suggest(key: str, names: dict, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; valid keys: {', '.join(prefix + n for n in names)}"


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


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
        sub = _dataclass_type(hints[f.name])
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
