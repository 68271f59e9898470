"""Training data: tokenize conversations with the chat template, mask, build the dataset, collate.

Reading files and checking records is ``records.py``'s (every bad record reported at once, true line
numbers), turning a record into a conversation ``formats.py``'s (messages / sharegpt / alpaca, content
parts, tool calls, the leading-assistant rule), the report ``datareport.py``'s. Here: each conversation is
rendered by the tokenizer's chat template; labels are ``-100`` everywhere except on the trained assistant
turns (the answer, the tool calls the template renders, and the closing ``<|im_end|>``), unless
``train_on_prompt``. Checking and tokenization run through ``datasets.map``, so their results are cached on
disk and a second run with the same file, tokenizer and settings does not redo them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .chat_template import IM_END, IM_START, QWEN_CHAT_TEMPLATE, load_chat_template
from .datareport import DataReport
from .errors import UserError
from .formats import RecordProblem, target_turns, to_conversation
from .records import CODE_DIGEST, PROBLEM, RawRecords, check_records, load_raw, parse_row
from .records import check_data_path  # noqa: F401 - imported from here by qwenloop.checks

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# tokenizer and template
# --------------------------------------------------------------------------------------------


def ensure_chat_template(tokenizer, source: str, override: str | None = None) -> None:
    """Give the tokenizer a chat template: the configured one, its own, or Qwen's ChatML."""
    if override:
        tokenizer.chat_template = load_chat_template(override)  # the text itself, or the file it names
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


def tokenize_conversation(tokenizer, messages: list[dict], train_on_prompt: bool,
                          tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation (``tools``: the function schemas a tool-calling template shows).

    The targets are the trained assistant turns (``formats.target_turns``: not a greeting before the first
    user turn), each from its first token to its end-of-turn token: the answer, the tool calls the template
    renders for it, and ``<|im_end|>``. Trailing whitespace after it (the newline after ``<|im_end|>``) is
    not a target: the model should learn to stop at ``<|im_end|>``. Turns are located by rendering growing
    prefixes of the conversation; a template that renders a turn differently once later turns follow
    (Qwen3's drops the empty ``<think></think>`` block from earlier answers) is not prefix-consistent, and its
    turns are located by what changes when each is replaced by a marker. Raises ``RecordProblem``.
    """
    text = _render(tokenizer, messages, tools)
    input_ids = _ids(tokenizer, text)
    if train_on_prompt:
        return input_ids, list(input_ids)
    spans = _spans_by_prefix(tokenizer, messages, tools, input_ids)
    if spans is None:
        input_ids, spans = _spans_by_difference(tokenizer, messages, tools, text)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn, start, end in spans:
        _check_tool_calls_rendered(tokenizer, messages[turn], turn, input_ids[start:end])
        labels[start:end] = input_ids[start:end]
    for tool in tools or ():
        if tool["function"]["name"] not in text:
            raise RecordProblem(f"the chat template does not render the record's tools ({tool['function']['name']!r} "
                                f"is not in its text); {TOOL_TEMPLATE_HINT}")
    return input_ids, labels


TOOL_TEMPLATE_HINT = "set chat_template to a template with tool calling (Qwen2.5's and Qwen3's own have it)"


def _render(tokenizer, messages: list[dict], tools, generation_prompt: bool = False) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception(...) in a template, and its slips
        why = (str(e).splitlines() or [""])[0]
        raise RecordProblem(f"the chat template cannot render it ({type(e).__name__}: {why}); fix the record, or set "
                            f"chat_template to a template that takes it")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _spans_by_prefix(tokenizer, messages, tools, input_ids) -> list[tuple[int, int, int]] | None:
    """(turn, first token, end token) of each trained turn, or None when the template is not prefix-consistent."""
    spans = []
    for i in target_turns(messages):
        prompt = _ids(tokenizer, _render(tokenizer, messages[:i], tools, generation_prompt=True))
        upto = _ids(tokenizer, _render(tokenizer, messages[: i + 1], tools))
        start, end = len(prompt), len(upto)
        if input_ids[:end] != upto or input_ids[:start] != prompt:
            return None
        while end > start and not tokenizer.decode(input_ids[end - 1 : end]).strip():
            end -= 1
        spans.append((i, start, end))
    return spans


def _spans_by_difference(tokenizer, messages, tools, text) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Spans for a template that is not prefix-consistent: render the conversation again with one trained turn
    replaced by a marker (no tool calls, no reasoning); the text that differs is what the template renders for
    that turn (its answer, its tool calls, a reasoning block), and the end-of-turn token right after it is a
    target too. Tool calls are rendered from fields, not copied from ``content``, so searching the rendered
    text for the content would not find them. Needs a fast tokenizer (character offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise RecordProblem("the chat template is not prefix-consistent, and locating answers in its text needs a fast "
                            "tokenizer (character offsets); load the model's tokenizer.json, or use a prefix-consistent template")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets, eos = encoded["offset_mapping"], tokenizer.eos_token or IM_END
    spans = []
    for i in target_turns(messages):
        marked = _render(tokenizer, messages[:i] + [{"role": "assistant", "content": MARKER}] + messages[i + 1 :], tools)
        if MARKER not in marked:
            raise RecordProblem(f"assistant turn {i} cannot be located: the chat template does not render assistant "
                                f"content as given; set chat_template to a template that does")
        start, end = _changed_span(text, marked)
        end += len(eos) if text.startswith(eos, end) else 0
        tokens = [k for k, (a, b) in enumerate(offsets) if b > a and start <= a and b <= end]
        if tokens:
            spans.append((i, tokens[0], tokens[-1] + 1))
    return list(encoded["input_ids"]), spans


# Stands in for a turn in _spans_by_difference. Empty content would be ambiguous: a tool call starts with the
# same "<" as the "<|im_end|>" that follows an empty answer, so the common prefix would swallow it; no
# answer starts or ends with a NUL character.
MARKER = "\x00"


def _changed_span(text: str, other: str) -> tuple[int, int]:
    """[start, end) of ``text`` that differs from ``other``: what is left after their common prefix and suffix."""
    prefix = _common_prefix(text, other)
    suffix = _common_prefix(text[prefix:][::-1], other[prefix:][::-1])
    return prefix, len(text) - suffix


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))  # bisection over slice comparisons: C speed on long conversations
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _check_tool_calls_rendered(tokenizer, turn: dict, i: int, target_ids: list[int]) -> None:
    """A template without tool calling renders an assistant turn that only calls tools as an empty answer,
    which would train the model to say nothing: refuse it instead."""
    calls = turn.get("tool_calls") or ()
    if calls:
        target = tokenizer.decode(target_ids)
        missing = [c["function"]["name"] for c in calls if c["function"]["name"] not in target]
        if missing:
            raise RecordProblem(f"the chat template does not render the tool calls of assistant turn {i} ({missing[0]!r} "
                                f"is not in its text); {TOOL_TEMPLATE_HINT}")


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedData:
    dataset: Any  # datasets.Dataset with input_ids, labels, num_targets, length
    truncated: int
    dropped: int
    bad_records: int = 0  # records left out by bad_records: skip (the data report in the log lists them)

    @property
    def target_tokens(self) -> int:
        return int(sum(self.dataset["num_targets"]))

    @property
    def lengths(self) -> list[int]:
        """Tokens of each example (for packing and length grouping)."""
        return list(self.dataset["length"])


def build_dataset(path: str, tokenizer, cfg) -> TokenizedData:
    """Load, check every record, tokenize (cached by ``datasets``), truncate or drop over-long examples.

    Bad records: with ``bad_records: error`` (the default) a report of all of them is logged and one
    ``UserError`` raised, before tokenizing when they can be found without the tokenizer; with ``skip`` they
    are left out, logged once and counted (``TokenizedData.bad_records``)."""
    policy = getattr(cfg, "bad_records", "error")  # callers may pass a plain namespace of the data settings
    raw = load_raw(path)
    checked = check_records(raw, cfg.format)
    report = DataReport(path, len(raw.dataset), located(raw, checked.problems))
    if report.problems and policy == "error":  # the report is complete without tokenizing anything
        judge(report, None, policy, cfg.max_seq_len)
    tokenized = tokenize_records(raw, checked.good, tokenizer, cfg)
    report.problems = located(raw, checked.problems + tokenized.problems)
    kept = select_kept(tokenized.dataset, cfg.truncation)
    judge(report, kept, policy, cfg.max_seq_len)
    dataset = tokenized.dataset
    if len(kept.rows) < len(dataset):
        dataset = dataset.select(kept.rows)
    dataset = dataset.remove_columns(["too_long", "full_length", PROBLEM])
    return TokenizedData(dataset, truncated=kept.truncated, dropped=kept.dropped, bad_records=len(report.problems))


def judge(report: DataReport, kept: "Kept | None", policy: str, max_seq_len: int, log: bool = True) -> None:
    """Raise what a run stops with for this file, if anything, and log the report as a run does (``qwenloop
    data`` prints it itself, then asks the same question with ``log=False``)."""
    if report.problems and policy == "error":
        if log and len(report.problems) > 1:  # one bad record: the error line says it all
            report.log(logging.ERROR)
        raise report.error()
    if log:
        report.log(logging.WARNING, f"bad_records: skip: training without these {len(report.problems)} record(s)")
    if kept is not None and not kept.rows:
        if not kept.good:
            raise report.nothing_left()
        raise UserError(f"{report.path}: no example left after truncation to max_seq_len={max_seq_len} "
                        f"({kept.too_long} too long); raise max_seq_len")


@dataclass
class Tokenized:
    dataset: Any  # one row per good record (``Checked.good``): input_ids, labels, num_targets, length, full_length, too_long, problem
    problems: list[tuple[int, str]]  # (raw row, what is wrong) found while tokenizing


def tokenize_records(raw: RawRecords, good: list[int], tokenizer, cfg) -> Tokenized:
    import datasets

    rows = raw.dataset if len(good) == len(raw.dataset) else raw.dataset.select(good)
    ints = datasets.Value("int64")
    features = datasets.Features({"input_ids": datasets.Sequence(ints), "labels": datasets.Sequence(ints), "num_targets": ints,
                                  "length": ints, "full_length": ints, "too_long": datasets.Value("bool"),
                                  PROBLEM: datasets.Value("string")})
    if not good:  # datasets' map of no rows returns no columns either
        return Tokenized(datasets.Dataset.from_dict({name: [] for name in features}, features=features), [])
    settings = dict(is_text=raw.is_text, requested_format=cfg.format, max_len=cfg.max_seq_len, policy=cfg.truncation,
                    train_on_prompt=cfg.train_on_prompt, code=CODE_DIGEST)
    dataset = rows.map(_encode, fn_kwargs={"tokenizer": tokenizer, **settings}, remove_columns=rows.column_names,
                       features=features, desc=f"tokenizing {os.path.basename(raw.path)}")
    problems = [(good[k], p) for k, p in enumerate(dataset[PROBLEM]) if p]
    return Tokenized(dataset, problems)


def _encode(row, tokenizer, is_text, requested_format, max_len, policy, train_on_prompt, code) -> dict:
    try:
        conversation = to_conversation(parse_row(row, is_text), requested_format)
        input_ids, labels = tokenize_conversation(tokenizer, conversation.messages, train_on_prompt, conversation.tools)
    except RecordProblem as e:
        return {"input_ids": [], "labels": [], "num_targets": 0, "length": 0, "full_length": 0, "too_long": False, PROBLEM: str(e)}
    full_length = len(input_ids)
    too_long = full_length > max_len
    if too_long and policy == "truncate":
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    num_targets = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # the first label is never predicted
    return {"input_ids": input_ids, "labels": labels, "num_targets": num_targets, "length": len(input_ids),
            "full_length": full_length, "too_long": too_long, PROBLEM: ""}


@dataclass
class Kept:
    rows: list[int]  # rows of the tokenized dataset that are trained on
    good: int  # records tokenized without a problem
    too_long: int  # good records longer than max_seq_len
    truncated: int  # ... cut to max_seq_len (truncation: truncate)
    dropped: int  # good records left out: too long (truncation: drop) or no target left after the cut


def select_kept(tokenized, truncation: str) -> Kept:
    """Which tokenized records are trained on (``build_dataset`` and ``qwenloop data`` count the same way)."""
    rows, too_long, good = [], 0, 0
    columns = tokenized.select_columns([PROBLEM, "num_targets", "too_long"]).to_dict()
    for i, (problem, n, long_) in enumerate(zip(columns[PROBLEM], columns["num_targets"], columns["too_long"])):
        if problem:
            continue
        good += 1
        too_long += long_
        if n > 0 and not (long_ and truncation == "drop"):
            rows.append(i)
    return Kept(rows, good, too_long, too_long if truncation == "truncate" else 0, good - len(rows))


def located(raw: RawRecords, problems: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """(location, problem) in file order, the location as the report names it."""
    where = raw.locations() if problems else []
    return [(where[i], p) for i, p in sorted(problems)]


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
