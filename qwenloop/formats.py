"""Record formats: one training record (``messages``, ``sharegpt`` or ``alpaca``) turned into the conversation a
chat template renders: ``messages`` (``role``, ``content``, and for tool calling ``tool_calls`` and ``tool``
turns) plus an optional ``tools`` list, in the OpenAI shape Hugging Face chat templates (Qwen's included) take.

The rules a user can rely on (README "Data"):

* content may be a string or a list of text parts (``[{"type": "text", "text": ...}]``), joined with newlines;
* an assistant turn before the first user turn (a greeting opening a ShareGPT dump) is kept as context and
  never trained on: it answers nothing, and a model is never asked to speak first;
* tool calls (``tool_calls``, with ``arguments`` as an object or a JSON string) and tool results (role
  ``tool``) are normalised to the OpenAI shape; ShareGPT's ``function_call`` / ``observation`` turns (the
  LLaMA-Factory convention) become the same.

Whatever cannot be used raises ``RecordProblem`` with what is wrong and what to do; the caller adds where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "function_call": "assistant",  # LLaMA-Factory's ShareGPT tool calling: the value is the call as JSON
    "observation": "tool",
    "tool": "tool",
}
FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}
EXPECTED_KEYS = "'messages', 'conversations' (sharegpt) or 'instruction'+'output' (alpaca)"


class RecordProblem(Exception):
    """What is wrong with one record, and what to do; its location is added by whoever reports it."""


@dataclass
class Conversation:
    """One record as a chat template takes it."""

    messages: list[dict]
    tools: list[dict] | None
    format: str

    def stats(self) -> dict:
        """Per-record numbers for ``qwenloop data`` (all ints: one ``datasets`` column each)."""
        roles = [m["role"] for m in self.messages]
        return {
            "format": self.format,
            "turns": len(roles),
            "leading_assistant": roles.count("assistant") - len(target_turns(self.messages)),
            "tool_calls": sum(len(m.get("tool_calls") or ()) for m in self.messages),
            "tool_results": roles.count("tool"),
            "with_tools": int(bool(self.tools)),
        }


EMPTY_STATS = {"format": "", "turns": 0, "leading_assistant": 0, "tool_calls": 0, "tool_results": 0, "with_tools": 0}


def target_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant turns that are trained on: those after the first user turn. An assistant turn
    before it (a greeting) is context: it answers nothing, and a model is never asked to speak first."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first_user]


def detect_format(record: dict, requested: str) -> str:
    """The format of one record (``auto``: from its keys); checks an explicitly requested one."""
    found = [name for name, keys in FORMAT_KEYS.items() if all(record.get(k) is not None for k in keys)]
    if requested != "auto":
        if requested not in found:
            guess = f"; set format: {found[0]} (or auto)" if found else ""
            raise RecordProblem(f"format {requested!r} expects field(s) {'/'.join(FORMAT_KEYS[requested])} but the "
                                f"record has keys {sorted(record)}{guess}")
        return requested
    if not found:
        raise RecordProblem(f"cannot tell the format (keys {sorted(record)}); expected {EXPECTED_KEYS}{_nesting_hint(record)}")
    return found[0]


def _nesting_hint(record: dict) -> str:
    """A file whose records sit in a list under one key (``{"data": [...]}``) is a common export."""
    lists = [k for k, v in record.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if len(record) == 1 and lists:
        return f"; the records seem to be the list under {lists[0]!r}: write them one per line (JSONL) or as a top-level array"
    return ""


def to_conversation(record: dict, requested_format: str) -> Conversation:
    """Normalise one record; raises ``RecordProblem`` saying what is wrong and what to do."""
    fmt = detect_format(record, requested_format)
    if fmt == "alpaca":
        messages, tools = _alpaca(record), None
    else:
        messages = _turns(record, fmt)
        tools = _tools(record.get("tools"))
        system = record.get("system")  # LLaMA-Factory's ShareGPT keeps the system prompt beside the turns
        if isinstance(system, str) and system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordProblem("conversation has no assistant turn, so nothing to train on; add the answer or remove the record")
    if not target_turns(messages):
        raise RecordProblem("its only assistant turn(s) come before the first user turn: such a turn is context, never "
                            "trained on (a model never speaks first), so nothing is left to train on; add the user "
                            "turn it answers, or remove the record")
    return Conversation(messages, tools, fmt)


def _alpaca(record: dict) -> list[dict]:
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise RecordProblem("alpaca records need string 'instruction' and 'output'")
    if not output.strip():
        raise RecordProblem("empty 'output': there is nothing to train on; write the answer or remove the record")
    prompt = instruction if not extra else f"{instruction}\n\n{extra}"
    _encodable([prompt, output, record.get("system")], "the record")
    turns = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) and record["system"] else []
    return turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _turns(record: dict, fmt: str) -> list[dict]:
    key, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    raw = record.get(key)
    if not isinstance(raw, list):
        raise RecordProblem(f"{key!r} must be a list of turns, got {type(raw).__name__}")
    if not raw:
        raise RecordProblem("empty conversation; remove the record")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or role_key not in turn:
            raise RecordProblem(f"turn {i} needs {role_key!r} and {content_key!r}")
        turns.append(_turn(turn, i, fmt, role_key, content_key))
    return turns


def _turn(turn: dict, i: int, fmt: str, role_key: str, content_key: str) -> dict:
    role = turn[role_key]
    if not isinstance(role, str):
        raise RecordProblem(f"turn {i} has {role_key!r} {role!r}, not a string; fix that turn")
    if fmt == "sharegpt":
        if role not in SHAREGPT_ROLES:
            raise RecordProblem(f"turn {i} has unknown 'from' {role!r}; use one of {sorted(SHAREGPT_ROLES)}")
        if role == "function_call":
            return {"role": "assistant", "content": "", "tool_calls": _tool_calls(_json_value(turn.get(content_key), i), i)}
        role = SHAREGPT_ROLES[role]
    elif role not in ROLES:
        raise RecordProblem(f"turn {i} has unknown role {role!r}; use one of {list(ROLES)}")
    out = {"role": role}
    calls = turn.get("tool_calls") if fmt == "messages" else None
    if calls is not None and role != "assistant":
        raise RecordProblem(f"turn {i}: only assistant turns make tool calls, this one is {role!r}; fix its role")
    if calls is not None:
        out["tool_calls"] = _tool_calls(calls, i)
    content = turn.get(content_key)
    if content is None and not out.get("tool_calls"):
        raise RecordProblem(f"turn {i} needs {role_key!r} and {content_key!r} (null only in an assistant turn making tool calls)")
    out["content"] = _text(content, i)
    if role == "assistant" and isinstance(turn.get("reasoning_content"), str):
        out["reasoning_content"] = turn["reasoning_content"]  # Qwen3's template renders it in <think>
    return _encodable(out, f"turn {i}")


def _encodable(value, what: str):
    """JSON may escape half of a UTF-16 surrogate pair (``"\\ud800"``, seen in scraped data); Python reads it
    as a string that is not text, and the tokenizer fails on it with a TypeError naming nothing."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordProblem(f"{what} holds an unpaired surrogate (\\u{ord(e.object[e.start]):04x}, half of a UTF-16 "
                            f"pair), which is not text; fix that escape or remove the record")
    return value


def _text(content: Any, i: int) -> str:
    """A turn's text: a string, null (an assistant turn that only calls tools), or a list of text parts joined
    with newlines (the OpenAI format; parts that are not text cannot be trained on a text model)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RecordProblem(f"turn {i} content must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RecordProblem(f"turn {i} content part {j} is {kind!r}, not text ({{\"type\": \"text\", \"text\": ...}}); "
                                f"a text model trains on text only: remove that part or the record")
    return "\n".join(texts)


def _json_value(value: Any, i: int) -> Any:
    """A field that may hold JSON as a string (tool arguments, tools and calls in LLaMA-Factory's format)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordProblem(f"turn {i}: {value[:40]!r} is not valid JSON ({e.msg}); write it as a JSON object")


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """Tool calls in the OpenAI shape Qwen's templates render: ``{"type": "function", "function": {"name",
    "arguments": {...}}}``. Arguments given as a JSON string are parsed: Qwen2.5's template would otherwise
    render them as one quoted string instead of an object."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RecordProblem(f"turn {i}: 'tool_calls' must be a non-empty list of calls; remove the key or fill it")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordProblem(f"turn {i}: tool call {k} needs a 'name' (under 'function', OpenAI style); fix the call")
        arguments = _json_value(fn.get("arguments", {}), i)
        if not isinstance(arguments, dict):
            raise RecordProblem(f"turn {i}: tool call {k} ({fn['name']}) has arguments that are not a JSON object; "
                                f"give them as an object (or a string holding one)")
        normal = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normal["id"] = call["id"]
        out.append(normal)
    return out


def _tools(tools: Any) -> list[dict] | None:
    """The record's ``tools`` (OpenAI style, or bare function schemas, which are wrapped the same way so that
    training renders them as a server passing OpenAI requests to the template would)."""
    if isinstance(tools, str):  # LLaMA-Factory keeps them as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise RecordProblem(f"'tools' is a string but not valid JSON ({e.msg}); give a list of function schemas")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordProblem("'tools' must be a list of function schemas ({\"type\": \"function\", \"function\": {...}})")
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordProblem(f"tools[{k}] has no function 'name'; give each tool as {{\"type\": \"function\", "
                                f"\"function\": {{\"name\": ..., \"parameters\": ...}}}}")
        out.append(tool if "function" in tool else {"type": "function", "function": tool})
    return _encodable(out, "'tools'")
