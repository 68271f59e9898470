"""Qwen's ChatML chat template, used when a tokenizer ships without one.

This is the template of the Qwen2 / Qwen2.5 instruct tokenizers (without tool calling): every turn is
``<|im_start|>{role}\n{content}<|im_end|>\n`` and a default system turn is added when the
conversation has none. It is prefix-consistent (rendering the first k turns gives a prefix of
rendering all of them), which the assistant-only label masking in ``data.py`` relies on.
"""

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
