"""Data loading, formats, chat template, label masking, truncation, collation, caching, bad input."""

import json
import os
from types import SimpleNamespace

import pytest

from conftest import write_jsonl
from qwenloop.data import IGNORE_INDEX, PaddingCollator, build_dataset, ensure_chat_template, tokenize_conversation
from qwenloop.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Repeat twice: red"},
    {"role": "assistant", "content": "red red"},
    {"role": "user", "content": "Now blue."},
    {"role": "assistant", "content": "blue blue"},
]


def cfg(**kw):
    base = dict(format="auto", max_seq_len=256, truncation="truncate", train_on_prompt=False)
    return SimpleNamespace(**{**base, **kw})


def target_segments(tokenizer, input_ids, labels):
    """Decode each run of consecutive target tokens separately."""
    segments, current = [], []
    for tok, lab in zip(input_ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def test_only_assistant_turns_are_targets_multi_turn(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, train_on_prompt=False)
    # Every assistant answer, closed by <|im_end|>, and nothing else: no system/user token, no newline.
    assert target_segments(tokenizer, ids, labels) == ["red red<|im_end|>", "blue blue<|im_end|>"]


def test_train_on_prompt_makes_everything_a_target(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, train_on_prompt=True)
    assert labels == ids


def test_rendering_is_qwen_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nRepeat twice: red<|im_end|>\n<|im_start|>assistant\nred red<|im_end|>\n"
    )


FORMATS = {
    "messages": {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi there"}]},
    "alpaca": {"instruction": "Say hi", "input": "", "output": "hi there"},
}


def _write(tmp_path, kind, records):
    import datasets

    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "d.jsonl", records))
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records))
        return str(path)
    ds = datasets.Dataset.from_list(records)
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
        return str(path)
    path = tmp_path / "saved"
    ds.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved"])
def test_every_format_and_file_kind(tmp_path, tokenizer, fmt, kind):
    path = _write(tmp_path, kind, [FORMATS[fmt]] * 3)
    for requested in ("auto", fmt):
        data = build_dataset(path, tokenizer, cfg(format=requested))
        assert len(data.dataset) == 3
        row = data.dataset[0]
        assert target_segments(tokenizer, row["input_ids"], row["labels"]) == ["hi there<|im_end|>"]
        assert "Say hi" in tokenizer.decode(row["input_ids"])


def test_alpaca_input_joins_instruction(tmp_path, tokenizer):
    path = _write(tmp_path, "jsonl", [{"instruction": "Translate", "input": "bonjour", "output": "hello"}])
    row = build_dataset(path, tokenizer, cfg()).dataset[0]
    assert "Translate\n\nbonjour" in tokenizer.decode(row["input_ids"])


def test_truncate_policy_cuts_and_counts(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]}
    short = FORMATS["messages"]
    path = _write(tmp_path, "jsonl", [short, long, short])
    data = build_dataset(path, tokenizer, cfg(max_seq_len=64))
    # The long example loses its answer when cut at 64 tokens: counted as truncated, then dropped as
    # having no target left.
    assert data.truncated == 1 and data.dropped == 1 and len(data.dataset) == 2
    assert all(len(ids) <= 64 for ids in data.dataset["input_ids"])


def test_truncate_keeps_partial_answers(tmp_path, tokenizer):
    rec = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "a b c d e f g h " * 20}]}
    data = build_dataset(_write(tmp_path, "jsonl", [rec]), tokenizer, cfg(max_seq_len=40))
    assert data.truncated == 1 and data.dropped == 0
    assert len(data.dataset[0]["input_ids"]) == 40 and data.dataset[0]["num_targets"] > 0


def test_drop_policy(tmp_path, tokenizer):
    rec = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "a b c d e f g h " * 20}]}
    data_path = _write(tmp_path, "jsonl", [rec, FORMATS["messages"]])
    data = build_dataset(data_path, tokenizer, cfg(max_seq_len=40, truncation="drop"))
    assert data.dropped == 1 and data.truncated == 0 and len(data.dataset) == 1


def test_tokenization_is_cached(tmp_path, tokenizer):
    path = _write(tmp_path, "jsonl", [FORMATS["messages"]] * 5)
    first = build_dataset(path, tokenizer, cfg())
    files = [f["filename"] for f in first.dataset.cache_files]
    assert files, "tokenized dataset is not backed by a cache file"
    mtimes = {f: os.path.getmtime(f) for f in files}
    second = build_dataset(path, tokenizer, cfg())
    assert [f["filename"] for f in second.dataset.cache_files] == files
    assert {f: os.path.getmtime(f) for f in files} == mtimes  # read back, not recomputed
    third = build_dataset(path, tokenizer, cfg(max_seq_len=100))  # a setting change is a new cache entry
    assert [f["filename"] for f in third.dataset.cache_files] != files


def test_collator_pads_right_and_masks():
    collate = PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [5] + [0] * 7
    assert batch["labels"][1].tolist() == [5] + [IGNORE_INDEX] * 7
    assert batch["attention_mask"].sum(1).tolist() == [3, 1]


# ---- bad input: one line naming file, line and what to do --------------------------------------


def _error(tmp_path, tokenizer, lines=None, records=None, **kw):
    if lines is not None:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(UserError) as info:
        build_dataset(str(path), tokenizer, cfg(**kw))
    assert "\n" not in str(info.value)
    return str(info.value)


GOOD = json.dumps(FORMATS["messages"])


def test_malformed_json_line_reports_line_number(tmp_path, tokenizer):
    msg = _error(tmp_path, tokenizer, lines=[GOOD, GOOD, '{"messages": [oops]}', GOOD])
    assert "bad.jsonl:3: malformed JSON" in msg


def test_no_assistant_turn(tmp_path, tokenizer):
    rec = {"messages": [{"role": "user", "content": "hello?"}]}
    msg = _error(tmp_path, tokenizer, records=[FORMATS["messages"], rec])
    assert "bad.jsonl:2: conversation has no assistant turn" in msg


def test_empty_conversation(tmp_path, tokenizer):
    msg = _error(tmp_path, tokenizer, records=[FORMATS["messages"], {"messages": []}])
    assert "bad.jsonl:2: empty conversation" in msg


def test_unknown_role(tmp_path, tokenizer):
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}
    msg = _error(tmp_path, tokenizer, records=[rec])
    assert "bad.jsonl:1: turn 1 has unknown role 'robot'" in msg


def test_unknown_sharegpt_speaker(tmp_path, tokenizer):
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "alien", "value": "b"}]}
    assert "unknown 'from' 'alien'" in _error(tmp_path, tokenizer, records=[rec])


def test_format_that_does_not_match_the_file(tmp_path, tokenizer):
    msg = _error(tmp_path, tokenizer, records=[FORMATS["messages"]], format="alpaca")
    assert "format 'alpaca' expects field(s) instruction/output" in msg and "set format: messages" in msg


def test_undetectable_format(tmp_path, tokenizer):
    assert "cannot tell the format" in _error(tmp_path, tokenizer, records=[{"text": "hi"}])


def test_missing_data_file(tmp_path, tokenizer):
    with pytest.raises(UserError, match="data file not found"):
        build_dataset(str(tmp_path / "none.jsonl"), tokenizer, cfg())


def test_tokenizer_without_template_falls_back_to_qwen(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    ensure_chat_template(tok, "tiny")
    assert tok.apply_chat_template(CONVERSATION[1:3], tokenize=False).startswith("<|im_start|>system")


def test_tokenizer_without_template_or_chatml_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(UserError, match="no chat template and no <\\|im_start\\|>/<\\|im_end\\|> tokens"):
        ensure_chat_template(tok, "plain-tokenizer")


# Qwen3-style: the last answer gets an empty think block that earlier answers lose once a later turn
# follows, so rendering a prefix changes earlier tokens (not prefix-consistent).
QWEN3_LIKE_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_that_is_not_prefix_consistent(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    ids, labels = tokenize_conversation(tok, CONVERSATION, train_on_prompt=False)
    assert tok.decode(ids).count("<think>") == 1  # only the last answer carries the think block
    assert target_segments(tok, ids, labels) == ["red red<|im_end|>", "blue blue<|im_end|>"]
