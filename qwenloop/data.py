"""Training data: load, normalise to chat messages, tokenize with the chat template, mask, collate.

Files: JSONL / JSON / parquet, or a directory written by ``Dataset.save_to_disk``. Formats:

* ``messages``  ``{"messages": [{"role": "user", "content": "..."}, ...]}`` (OpenAI style)
* ``sharegpt``  ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
* ``alpaca``    ``{"instruction": "...", "input": "...", "output": "..."}``

Every record becomes a list of ``{"role", "content"}`` turns rendered by the tokenizer's chat
template. Labels are ``-100`` everywhere except on assistant turns (content and the closing
``<|im_end|>``), unless ``train_on_prompt``. Tokenization runs through ``datasets.map`` so its result
is cached on disk and a second run with the same file, tokenizer and settings does not redo it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .chat_template import IM_END, IM_START, QWEN_CHAT_TEMPLATE
from .errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}


# --------------------------------------------------------------------------------------------
# loading raw records
# --------------------------------------------------------------------------------------------


def check_data_path(path: str) -> None:
    """A data file (or saved dataset directory) must exist; run before training by ``qwenloop.checks`` too."""
    if not os.path.exists(path):
        raise UserError(f"{path}: data file not found; set train_file/eval_file to an existing file or directory")


def load_records(path: str):
    """Load a data file as a ``datasets.Dataset`` of raw records, with clear errors for bad files."""
    import datasets

    check_data_path(path)
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad directory
            raise UserError(f"{path}: not a dataset saved with Dataset.save_to_disk ({type(e).__name__}: {e})")
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path}: a DatasetDict without a 'train' split; save a single Dataset instead")
            ds = ds["train"]
        return ds
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        _check_json(path, ext)
        builder = "json"
    elif ext == ".parquet":
        builder = "parquet"
    else:
        raise UserError(f"{path}: unsupported file type {ext!r}; use .jsonl, .json, .parquet or a saved dataset directory")
    try:
        ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train")
    except Exception as e:  # noqa: BLE001 - arrow schema errors, mixed types
        raise UserError(f"{path}: could not be read as {builder} ({type(e).__name__}: {str(e).splitlines()[0]})")
    if len(ds) == 0:
        raise UserError(f"{path}: holds no records")
    return ds


def _check_json(path: str, ext: str) -> None:
    """Find malformed JSON ourselves: pyarrow's errors carry no line numbers."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if ext == ".json" and head.startswith("["):
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix that line")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise UserError(f"{path}: record {i} is not a JSON object")
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or remove that line")
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object, got {type(rec).__name__}")


def detect_format(record: dict, path: str, requested: str) -> str:
    """The format of ``record``; checks an explicitly requested format against the file."""
    found = [name for name, keys in FORMAT_KEYS.items() if all(k in record for k in keys)]
    if requested != "auto":
        if requested not in found:
            expected = "/".join(FORMAT_KEYS[requested])
            guess = f"; set format: {found[0]} (or auto)" if found else ""
            raise UserError(
                f"{path}: format {requested!r} expects field(s) {expected} but the first record has keys "
                f"{sorted(record)}{guess}"
            )
        return requested
    if not found:
        raise UserError(
            f"{path}: cannot tell the format of the first record (keys {sorted(record)}); expected 'messages', "
            f"'conversations' (sharegpt) or 'instruction'+'output' (alpaca)"
        )
    return found[0]


def to_messages(record: dict, fmt: str, where: str) -> list[dict[str, str]]:
    """Normalise one record to ``[{"role", "content"}, ...]``; ``where`` names it in errors (file:line)."""
    if fmt == "alpaca":
        instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise UserError(f"{where}: alpaca records need string 'instruction' and 'output'")
        if not output.strip():
            raise UserError(f"{where}: empty 'output': there is nothing to train on; remove the record")
        prompt = instruction if not extra else f"{instruction}\n\n{extra}"
        turns = []
        if isinstance(record.get("system"), str) and record["system"]:
            turns.append({"role": "system", "content": record["system"]})
        return turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]

    key, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    raw = record.get(key)
    if not isinstance(raw, list):
        raise UserError(f"{where}: {key!r} must be a list of turns, got {type(raw).__name__}")
    if not raw:
        raise UserError(f"{where}: empty conversation; remove the record")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise UserError(f"{where}: turn {i} needs {role_key!r} and {content_key!r}")
        role = turn[role_key]
        if fmt == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise UserError(f"{where}: turn {i} has unknown 'from' {role!r}; use one of {sorted(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        elif role not in ROLES:
            raise UserError(f"{where}: turn {i} has unknown role {role!r}; use one of {list(ROLES)}")
        content = turn[content_key]
        if not isinstance(content, str):
            raise UserError(f"{where}: turn {i} content must be a string, got {type(content).__name__}")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise UserError(f"{where}: conversation has no assistant turn, so nothing to train on; remove it or add one")
    return turns


# --------------------------------------------------------------------------------------------
# tokenizer and template
# --------------------------------------------------------------------------------------------


def ensure_chat_template(tokenizer, source: str, override: str | None = None) -> None:
    """Give the tokenizer a chat template: the configured one, its own, or Qwen's ChatML."""
    if override:
        tokenizer.chat_template = open(override, encoding="utf-8").read() if os.path.isfile(override) else override
        return
    if getattr(tokenizer, "chat_template", None):
        return
    vocab = tokenizer.get_vocab()
    if IM_START in vocab and IM_END in vocab:
        logger.info("tokenizer at %s has no chat template: using Qwen's ChatML template", source)
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        return
    raise UserError(
        f"{source}: tokenizer has no chat template and no {IM_START}/{IM_END} tokens to fall back on Qwen's; "
        f"set chat_template in the training config"
    )


def tokenize_conversation(tokenizer, messages: list[dict], train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation.

    The template is rendered for growing prefixes of the conversation: the tokens between "prefix
    up to turn i with a generation prompt" and "prefix including assistant turn i" are turn i's
    answer. Trailing whitespace after the answer (the newline after ``<|im_end|>``) is not a target:
    the model should learn to stop at ``<|im_end|>``. Templates that render a turn differently once
    later turns follow (Qwen3's drops the empty ``<think></think>`` block from earlier answers) are
    not prefix-consistent; their answers are located in the rendered text instead.
    """

    def ids(msgs, generation_prompt=False) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = ids(messages)
    if train_on_prompt:
        return input_ids, list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(ids(messages[:i], generation_prompt=True))
        upto = ids(messages[: i + 1])
        end = len(upto)
        if input_ids[:end] != upto:
            return _labels_by_search(tokenizer, messages)
        while end > start and not tokenizer.decode(input_ids[end - 1 : end]).strip():
            end -= 1
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def _labels_by_search(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Labels for a template that is not prefix-consistent: find each turn's text, in order, in the
    rendered conversation; an assistant answer and the end-of-turn token right after it are targets.
    Needs a fast tokenizer (character offsets)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token or IM_END
    spans, pos = [], 0
    for i, turn in enumerate(messages):
        found = text.find(turn["content"], pos)
        if found < 0:
            if turn["role"] == "assistant":
                raise UserError(
                    f"assistant turn {i} does not appear verbatim in the text the chat template renders, so its "
                    f"tokens cannot be located; set chat_template to a template that keeps answers as they are"
                )
            continue
        pos = found + len(turn["content"])
        if turn["role"] == "assistant":
            end = pos + len(eos) if text.startswith(eos, pos) else pos
            spans.append((found, end))
            pos = end
    labels = [IGNORE_INDEX] * len(encoded["input_ids"])
    for k, (tok_start, tok_end) in enumerate(encoded["offset_mapping"]):
        if tok_end > tok_start and any(s <= tok_start and tok_end <= e for s, e in spans):
            labels[k] = encoded["input_ids"][k]
    return list(encoded["input_ids"]), labels


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedData:
    dataset: Any  # datasets.Dataset with input_ids, labels, num_targets
    truncated: int
    dropped: int

    @property
    def target_tokens(self) -> int:
        return int(sum(self.dataset["num_targets"]))

    @property
    def lengths(self) -> list[int]:
        """Tokens of each example (for packing and length grouping)."""
        return list(self.dataset["length"])


def build_dataset(path: str, tokenizer, cfg) -> TokenizedData:
    """Load, validate, tokenize (cached by ``datasets``), truncate or drop over-long examples."""
    records = load_records(path)
    fmt = detect_format(records[0], path, cfg.format)
    is_jsonl = path.endswith(".jsonl")
    max_len, policy, train_on_prompt = cfg.max_seq_len, cfg.truncation, cfg.train_on_prompt

    def encode(record: dict, index: int) -> dict:
        # Line numbers for JSONL (blank lines aside, record i is line i+1); record index otherwise.
        where = f"{path}:{index + 1}" if is_jsonl else f"{path}: record {index}"
        messages = to_messages(record, fmt, where)
        input_ids, labels = tokenize_conversation(tokenizer, messages, train_on_prompt)
        too_long = len(input_ids) > max_len
        if too_long and policy == "truncate":
            input_ids, labels = input_ids[:max_len], labels[:max_len]
        num_targets = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # the first label is never predicted
        return {"input_ids": input_ids, "labels": labels, "num_targets": num_targets, "length": len(input_ids), "too_long": too_long}

    tokenized = records.map(
        encode,
        with_indices=True,
        remove_columns=records.column_names,
        desc=f"tokenizing {os.path.basename(path)}",
    )
    too_long = sum(tokenized["too_long"])
    keep = [i for i, (n, long_) in enumerate(zip(tokenized["num_targets"], tokenized["too_long"])) if n > 0 and not (long_ and policy == "drop")]
    dropped = len(tokenized) - len(keep)
    if dropped:
        tokenized = tokenized.select(keep)
    tokenized = tokenized.remove_columns(["too_long"])
    if len(tokenized) == 0:
        raise UserError(
            f"{path}: no example left after truncation to max_seq_len={max_len} ({too_long} too long); "
            f"raise max_seq_len"
        )
    return TokenizedData(tokenized, truncated=too_long if policy == "truncate" else 0, dropped=dropped)


def finish_batch(input_ids: torch.Tensor, labels: torch.Tensor, example_lengths: list[int], **inputs: torch.Tensor) -> dict:
    """The batch the loop consumes: model inputs, labels, where the targets are, and counts.

    ``target_index`` holds the flat positions (``row * width + col``) of the hidden states whose *next*
    token is a target, and ``target_labels`` those next tokens: the LM head and the loss run on these
    rows only (``loss.TargetLossHead``). They are computed here, on the CPU, while the batch is built,
    so that the training step never asks the GPU which positions are targets (a host synchronisation).
    ``num_targets``, ``num_tokens`` (non-padding) and ``num_positions`` are plain ints for the same
    reason: accelerate moves tensors to the device and leaves ints alone. ``attention_pairs`` (causal
    query-key pairs, ``l*(l+1)/2`` per example of length ``l``) feeds the FLOPs count of ``flops.py``.
    """
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]
    target_index = (next_labels != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    return {
        "input_ids": input_ids,
        "labels": labels,
        **inputs,
        "target_index": target_index,
        "target_labels": next_labels.reshape(-1)[target_index],
        "num_targets": int(target_index.numel()),
        "num_tokens": sum(example_lengths),
        "num_positions": labels.numel(),
        "attention_pairs": sum(n * (n + 1) // 2 for n in example_lengths),
    }


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # what of a batch goes into model(...)


@dataclass
class PaddingCollator:
    """Pads a list of examples to the longest one (rounded up to ``pad_to_multiple_of``)."""

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        m = self.pad_to_multiple_of
        width = (longest + m - 1) // m * m if m > 1 else longest
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        lengths = [len(e["input_ids"]) for e in examples]
        return finish_batch(input_ids, labels, lengths, attention_mask=attention_mask)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): identical on every rank and in every run.

    Not a ``RandomSampler`` on purpose: accelerate leaves a custom sampler alone, and calls
    ``set_epoch`` on it at the start of every pass over the prepared dataloader.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterable[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())
