"""Reading text into the training config: a YAML file and ``--key value`` command-line overrides become
the typed dataclasses of ``qwenloop.config``, which passes its classes in (this module never imports it).

The YAML is read with a ``yaml.SafeLoader`` that refuses duplicate keys; a file must be UTF-8 (a BOM is
fine). Nested groups are addressed with a dot on the command line (``--lora.r 16``).

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
from dataclasses import fields
from typing import Any, Literal, Union

import yaml

from .chat_template import is_template_text
from .errors import UserError


def expand_home(value: Any) -> Any:
    """A path field's value with a leading ``~`` / ``~user`` expanded (a path object becomes its string);
    a Jinja chat template and anything that is not a path are returned as they are."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value.startswith("~") and not is_template_text(value):
        return os.path.expanduser(value)
    return value


# --------------------------------------------------------------------------------------------
# a config file plus overrides -> an instance of the config class
# --------------------------------------------------------------------------------------------


def read_config_file(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML config file (``{}`` for an empty file), unquoted scalars kept as typed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found; pass the path of a YAML training config")
    raw = load_yaml_text(_read_utf8(path), path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        kind = "text" if isinstance(raw, str) else f"a {type(raw).__name__}"
        raise UserError(f"{path}: the top level must be a mapping of config keys, got {kind}")
    return raw


def build_config(cls: type, raw: dict, overrides: list[str] | None, source: str):
    """An instance of the dataclass ``cls`` from ``raw`` (left unchanged) with ``--key value`` overrides applied,
    every value read by its field's type; not validated."""
    data = _deep_copy(raw)
    for dotted, value in parse_overrides(overrides or []):
        _set_dotted(cls, data, dotted, value)
    return _build(cls, data, source, prefix="")


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
        sub_cls = dataclass_type(typing.get_type_hints(node_cls)[part])  # hints: annotations may be strings
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
        sub = dataclass_type(hints[name])
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


def dataclass_type(tp: Any) -> type | None:
    """``tp`` when it is a dataclass (a nested group of settings), else None; ``tp`` is a resolved type hint."""
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
