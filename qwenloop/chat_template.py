"""Qwen's ChatML chat template, used when a tokenizer ships without one.

This is the template of the Qwen2 / Qwen2.5 instruct tokenizers (without tool calling): every turn is
``<|im_start|>{role}\n{content}<|im_end|>\n`` and a default system turn is added when the
conversation has none. It is prefix-consistent (rendering the first k turns gives a prefix of
rendering all of them), which the assistant-only label masking in ``data.py`` relies on.

Also: how a training config's ``chat_template`` value is told apart from a path, and checked.
"""

from __future__ import annotations

import os

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


# --------------------------------------------------------------------------------------------
# The training config's `chat_template`: the template itself, or the path of a file holding one
# --------------------------------------------------------------------------------------------

JINJA_TAGS = ("{{", "{%", "{#")


def is_template_text(value: str) -> bool:
    """Whether a ``chat_template`` value is Jinja text rather than a path. Without a single tag a template
    would render the same text for every conversation, so a value without one can only mean a file; and
    no sensible file name holds ``{{`` or ``{%``."""
    return any(tag in value for tag in JINJA_TAGS)


def chat_template_problem(value: str) -> str | None:
    """Why a ``chat_template`` value cannot be used (one line, without the key), or None when it can.

    The check matters because the alternative is silent: a path that does not exist would otherwise be
    taken as the template text, render every conversation to that text, and fail later with an error
    about something else (answers not found, examples too long)."""
    if is_template_text(value):
        return None
    if not value.strip():
        return "is empty; give a Jinja template, the path of a file holding one, or null (the tokenizer's own)"
    relative = "" if os.path.isabs(value) else f" (relative paths are read from the launch directory, here {os.getcwd()})"
    if not os.path.exists(value):
        return (f"file {value!r} not found{relative}; a value without a {{{{ }}}} or {{% %}} tag is read as the path "
                f"of a template file: fix the path, or give the Jinja template itself")
    try:
        text = read_template_file(value)
    except (OSError, UnicodeDecodeError) as e:
        why = "it is a directory" if os.path.isdir(value) else getattr(e, "strerror", None) or "not UTF-8 text"
        return f"cannot read the template file {value!r} ({why}); point it at a UTF-8 Jinja file"
    if not is_template_text(text):
        return (f"the file {value!r} holds no Jinja tag ({{{{ }}}} or {{% %}}), so every conversation would render to "
                f"the same text; point it at a chat template file")
    return None


def read_template_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_chat_template(value: str) -> str:
    """The template text of a ``chat_template`` value: the value itself, or the file it names (config
    validation has refused a path that cannot be read)."""
    return value if is_template_text(value) else read_template_file(value)
