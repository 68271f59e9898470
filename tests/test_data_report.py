"""Real-world data in, every problem reported at once (issue 11): the data report, true line numbers, BOMs,
leading assistant turns, content parts, tool calling with Qwen2.5's and Qwen3's formats, bad_records: skip,
and `qwenloop data`."""

import copy
import json
import logging
import re
from pathlib import Path

import pytest

from conftest import base_config, run_cli, write_yaml
from qwenloop.data import build_dataset, tokenize_conversation
from qwenloop.errors import UserError
from qwenloop.formats import RecordProblem, to_conversation
from test_data import cfg, target_segments

TEMPLATES = Path(__file__).resolve().parent / "templates"
GOOD = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
NO_ANSWER = {"messages": [{"role": "user", "content": "hello?"}]}


def _lines(path: Path, lines: list, bom: bool = False) -> str:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return str(path)


def _refusal(path, tokenizer, **kw) -> str:
    with pytest.raises(UserError) as info:
        build_dataset(str(path), tokenizer, cfg(**kw))
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- whole files: one line, exit 2, nothing written --------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    ("", "the file is empty (0 bytes)"),
    ("\n   \n\t\n", "holds no records, only 3 blank line(s)"),
])
def test_empty_and_blank_files_end_in_one_line_through_train(tmp_path, tiny_model, content, expected):
    data = tmp_path / "train.jsonl"
    data.write_text(content, encoding="utf-8")
    out = tmp_path / "run"
    proc = run_cli("train", write_yaml(tmp_path / "c.yaml", base_config(tiny_model, str(data), out)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data}: {expected}") and "train_file" in errors[0]
    assert not out.exists()


def test_several_bad_records_through_train_are_one_report_and_one_error_line(tmp_path, tiny_model):
    data = _lines(tmp_path / "train.jsonl", [GOOD, "{bad", "", NO_ANSWER, GOOD, "[]"])
    out = tmp_path / "run"
    proc = run_cli("train", write_yaml(tmp_path / "c.yaml", base_config(tiny_model, data, out)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data}: 3 of 5 records cannot be used"), errors
    report = proc.stderr[proc.stderr.index("data report: "):].splitlines()
    assert [line.split(": ", 1)[0].strip() for line in report[1:4]] == [f"{data}:{n}" for n in (2, 4, 6)]
    assert not out.exists()


def test_whole_file_problems_in_process(tmp_path, tokenizer):
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes(json.dumps(GOOD).encode("utf-16"))
    assert "UTF-16/UTF-32" in _refusal(utf16, tokenizer)
    empty_array = tmp_path / "a.json"
    empty_array.write_text("[]")
    assert "holds no records (an empty JSON array)" in _refusal(empty_array, tokenizer)
    broken_array = tmp_path / "b.json"
    broken_array.write_text('[\n  {"messages": []},\n  {oops}\n]')
    assert f"{broken_array}:3: malformed JSON" in _refusal(broken_array, tokenizer)


# ---- the report: every bad record, true line numbers ------------------------------------------------


def test_blank_lines_count_in_line_numbers(tmp_path, tokenizer):
    path = _lines(tmp_path / "d.jsonl", [GOOD, "", "", GOOD, "   ", NO_ANSWER, GOOD])
    msg = _refusal(path, tokenizer)
    assert msg.startswith(f"{path}:6: conversation has no assistant turn"), msg  # pyarrow's row index would say 3


def test_every_bad_record_is_reported_in_one_run(tmp_path, tokenizer, caplog):
    bad = {3: '{"messages": [oops]}', 6: NO_ANSWER, 8: "[1, 2]", 9: {"messages": [{"role": "robot", "content": "x"}]}}
    lines = [bad.get(n, GOOD) for n in range(1, 11)]
    lines.insert(4, "")  # a blank line: lines after it move down by one
    path = _lines(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.ERROR, logger="qwenloop"):
        msg = _refusal(path, tokenizer)
    assert msg.startswith(f"{path}: 4 of 10 records cannot be used") and f"the first is {path}:3: malformed JSON" in msg
    assert "bad_records: skip" in msg
    report = caplog.records[-1].getMessage().splitlines()
    assert report[0] == f"data report: {path}: 4 of 10 record(s) cannot be used:"
    assert [line.split(": ", 1)[0].strip() for line in report[1:]] == [f"{path}:{n}" for n in (3, 7, 9, 10)]
    assert "malformed JSON" in report[1] and "no assistant turn" in report[2]
    assert "must be a JSON object, got an array" in report[3] and "unknown role 'robot'" in report[4]


def test_report_lists_up_to_the_limit_then_counts(tmp_path, tokenizer, caplog):
    path = _lines(tmp_path / "d.jsonl", [GOOD] + ["{bad"] * 25)
    with caplog.at_level(logging.ERROR, logger="qwenloop"):
        assert "25 of 26 records" in _refusal(path, tokenizer)
    report = caplog.records[-1].getMessage().splitlines()
    assert len(report) == 1 + 20 + 1 and report[20].strip().startswith(f"{path}:21:")
    assert report[-1] == f"  ... and 5 more (qwenloop data {path} --max-errors 0 lists them all)"


def test_records_of_json_parquet_and_saved_datasets_are_named_by_index(tmp_path, tokenizer):
    import datasets

    records = [GOOD, GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}]
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(records, indent=2))
    ds = datasets.Dataset.from_list(records[:2] + [NO_ANSWER])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert _refusal(as_json, tokenizer).startswith(f"{as_json}: record 2: turn 1 content must be a string")
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        assert _refusal(path, tokenizer).startswith(f"{path}: record 2: conversation has no assistant turn")


def test_jsonl_content_in_a_json_file_keeps_line_numbers(tmp_path, tokenizer):
    path = _lines(tmp_path / "d.json", [GOOD, "", NO_ANSWER])
    assert _refusal(path, tokenizer).startswith(f"{path}:3: conversation has no assistant turn")


def test_a_json_array_saved_as_jsonl_is_read_as_an_array(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([GOOD, GOOD, NO_ANSWER], indent=2))
    assert _refusal(path, tokenizer).startswith(f"{path}: record 2: conversation has no assistant turn")
    mixed = _lines(tmp_path / "m.jsonl", ["[1, 2]", GOOD])  # a bad first line, not an array file
    assert _refusal(mixed, tokenizer).startswith(f"{mixed}:1: a record must be a JSON object, got an array")


def test_a_line_that_is_not_utf8_is_one_bad_record(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    assert _refusal(path, tokenizer).startswith(f"{path}:2: not UTF-8 text (byte 0xe9")


def test_an_edited_file_is_read_again(tmp_path, tokenizer):
    path = _lines(tmp_path / "d.jsonl", [GOOD])
    assert len(build_dataset(path, tokenizer, cfg()).dataset) == 1
    _lines(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD])  # the rows table is cached: keyed on size and mtime
    assert len(build_dataset(path, tokenizer, cfg()).dataset) == 3


# ---- formats real data comes in -------------------------------------------------------------------


def test_utf8_bom_is_accepted_at_the_start_and_after_concatenation(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    data = build_dataset(str(path), tokenizer, cfg())
    assert len(data.dataset) == 2 and data.bad_records == 0
    as_json = tmp_path / "d.json"
    as_json.write_text("\ufeff" + json.dumps([GOOD]), encoding="utf-8")
    assert len(build_dataset(str(as_json), tokenizer, cfg()).dataset) == 1


GREETING = "Hello! How can I help?"


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "assistant", "content": GREETING}, {"role": "user", "content": "Say hi"},
                  {"role": "assistant", "content": "hi there"}]},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": GREETING},
                  {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
    {"conversations": [{"from": "gpt", "value": GREETING}, {"from": "human", "value": "Say hi"},
                       {"from": "gpt", "value": "hi there"}]},
], ids=["first", "after-system", "sharegpt"])
def test_leading_assistant_turn_is_context_not_target(tmp_path, tokenizer, record):
    data = build_dataset(_lines(tmp_path / "d.jsonl", [record]), tokenizer, cfg())
    row = data.dataset[0]
    assert GREETING in tokenizer.decode(row["input_ids"])  # kept, as the context the user answered
    assert target_segments(tokenizer, row["input_ids"], row["labels"]) == ["hi there<|im_end|>"]
    with_prompt = build_dataset(_lines(tmp_path / "p.jsonl", [record]), tokenizer, cfg(train_on_prompt=True)).dataset[0]
    assert with_prompt["labels"] == with_prompt["input_ids"]


def test_only_a_leading_assistant_turn_leaves_nothing_to_train(tmp_path, tokenizer):
    record = {"messages": [{"role": "assistant", "content": GREETING}, {"role": "user", "content": "bye"}]}
    msg = _refusal(_lines(tmp_path / "d.jsonl", [GOOD, record]), tokenizer)
    assert ":2: its only assistant turn(s) come before the first user turn" in msg and "context" in msg


def test_content_parts_are_joined(tmp_path, tokenizer):
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]},
    ]}
    row = build_dataset(_lines(tmp_path / "d.jsonl", [record, GOOD]), tokenizer, cfg()).dataset[0]
    assert "<|im_start|>user\nSay\nhi<|im_end|>" in tokenizer.decode(row["input_ids"])
    assert target_segments(tokenizer, row["input_ids"], row["labels"]) == ["hi there<|im_end|>"]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    msg = _refusal(_lines(tmp_path / "i.jsonl", [image]), tokenizer)
    assert ":1: turn 0 content part 0 is 'image_url', not text" in msg


# ---- tool calling ---------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}  # a bare schema: wrapped as OpenAI's
TOOL_RECORD = {"tools": [WEATHER, TIME], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": "10:42"},
    {"role": "assistant", "content": "21 C at 10:42."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "content": [{"type": "text", "text": '{"temp": 25}'}]},
    {"role": "assistant", "content": "25 C."},
]}
CALLS_1 = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>')
CALL_2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
EXPECTED_TARGETS = {  # the assistant's tool calls and answers, and nothing of the tools list or the tool results
    "qwen2_5_tools": [CALLS_1, "21 C at 10:42.<|im_end|>", "Checking.\n" + CALL_2, "25 C.<|im_end|>"],
    "qwen3_tools": [CALLS_1, "21 C at 10:42.<|im_end|>", "Checking.\n" + CALL_2, "25 C.<|im_end|>"],
}


def _with_template(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


@pytest.mark.parametrize("template", sorted(EXPECTED_TARGETS))
def test_tool_calls_and_answers_are_the_only_targets(tmp_path, tokenizer, template):
    tok = _with_template(tokenizer, template)
    row = build_dataset(_lines(tmp_path / "d.jsonl", [TOOL_RECORD]), tok, cfg(max_seq_len=1024)).dataset[0]
    text = tok.decode(row["input_ids"])
    assert target_segments(tok, row["input_ids"], row["labels"]) == EXPECTED_TARGETS[template]
    # The template's own tool format: tools in the system turn, results back as one user turn of responses.
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '{"type": "function", "function": {"name": "get_time"' in text
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n10:42\n"
            "</tool_response><|im_end|>") in text
    if template == "qwen3_tools":  # not prefix-consistent: only the last answer carries the empty think block
        assert text.count("<think>") == 1 and "<think>\n\n</think>\n\n25 C." in text


def test_qwen3_template_is_not_prefix_consistent_with_tools(tokenizer):
    """The Qwen3 case really takes the other labelling path (rendering with one turn replaced)."""
    from qwenloop import data

    conv = to_conversation(TOOL_RECORD, "auto")
    tok = _with_template(tokenizer, "qwen3_tools")
    ids, _ = tokenize_conversation(tok, conv.messages, False, conv.tools)
    assert data._spans_by_prefix(tok, conv.messages, conv.tools, ids) is None
    tok25 = _with_template(tokenizer, "qwen2_5_tools")
    ids25, _ = tokenize_conversation(tok25, conv.messages, False, conv.tools)
    assert data._spans_by_prefix(tok25, conv.messages, conv.tools, ids25) is not None


def test_sharegpt_function_call_and_observation_turns(tokenizer):
    record = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Rome?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
        {"from": "observation", "value": '{"temp": 25}'},
        {"from": "gpt", "value": "25 C."},
    ]}
    conv = to_conversation(record, "auto")
    tok = _with_template(tokenizer, "qwen2_5_tools")
    ids, labels = tokenize_conversation(tok, conv.messages, False, conv.tools)
    assert target_segments(tok, ids, labels) == [CALL_2, "25 C.<|im_end|>"]


def test_a_template_without_tool_calling_is_refused_not_trained_silent(tmp_path, tokenizer):
    """Qwen's plain ChatML fallback ignores tool_calls: the call would be trained as an empty answer."""
    msg = _refusal(_lines(tmp_path / "d.jsonl", [TOOL_RECORD]), tokenizer, max_seq_len=1024)
    assert ":1: the chat template does not render the tool calls of assistant turn 2" in msg
    assert "set chat_template to a template with tool calling" in msg


@pytest.mark.parametrize("turn, expected", [
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": {}}}]}, "tool call 0 needs a 'name'"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "is not valid JSON"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "arguments that are not a JSON object"),
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}, "only assistant turns make tool calls"),
    ({"role": "assistant", "content": None}, "null only in an assistant turn making tool calls"),
])
def test_bad_tool_calls_are_reported(turn, expected):
    with pytest.raises(RecordProblem, match=re.escape(expected)):
        to_conversation({"messages": [{"role": "user", "content": "q"}, turn]}, "auto")


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
     "turn 0 holds an unpaired surrogate (\\ud800"),
    ('{"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}', "turn 0 has 'role' ['user'], not a string"),
    ('{"conversations": [{"from": {"x": 1}, "value": "a"}]}', "turn 0 has 'from' {'x': 1}, not a string"),
    ('{"data": [{"messages": []}]}', "the records seem to be the list under 'data'"),
    ('"just text"', "a record must be a JSON object, got a string"),
])
def test_odd_records_are_reported_never_a_crash(tmp_path, tokenizer, line, expected):
    assert expected in _refusal(_lines(tmp_path / "d.jsonl", [line]), tokenizer)


# ---- bad_records: skip ----------------------------------------------------------------------------


def test_skip_leaves_bad_records_out_counts_and_logs_them_once(tmp_path, tokenizer, caplog):
    path = _lines(tmp_path / "d.jsonl", [GOOD, "{bad", NO_ANSWER, GOOD, GOOD])
    with caplog.at_level(logging.WARNING, logger="qwenloop"):
        data = build_dataset(path, tokenizer, cfg(bad_records="skip"))
    assert len(data.dataset) == 3 and data.bad_records == 2
    reports = [r.getMessage() for r in caplog.records if "data report" in r.getMessage()]
    assert len(reports) == 1 and f"{path}:2: malformed JSON" in reports[0] and f"{path}:3: conversation" in reports[0]
    assert reports[0].endswith("bad_records: skip: training without these 2 record(s)")
    assert build_dataset(_lines(tmp_path / "ok.jsonl", [GOOD]), tokenizer, cfg(bad_records="skip")).bad_records == 0


def test_skip_still_refuses_a_file_with_nothing_left(tmp_path, tokenizer):
    msg = _refusal(_lines(tmp_path / "d.jsonl", ["{bad", NO_ANSWER]), tokenizer, bad_records="skip")
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}: none of its 2 records can be used")
    assert f"the first is {tmp_path / 'd.jsonl'}:1: malformed JSON" in msg


def test_skip_leaves_out_records_only_the_template_refuses(tmp_path, tokenizer):
    tok = _with_template(tokenizer, "qwen3_tools")
    no_query = {"messages": [{"role": "system", "content": "s"}, {"role": "tool", "content": "x"},
                             {"role": "user", "content": "<tool_response>q</tool_response>"}, {"role": "assistant", "content": "a"}]}
    path = _lines(tmp_path / "d.jsonl", [GOOD, no_query])
    assert "the chat template cannot render it (TemplateError: No user query found" in _refusal(path, tok)
    assert build_dataset(path, tok, cfg(bad_records="skip")).bad_records == 1


# ---- qwenloop data ------------------------------------------------------------------------------


def test_data_statistics_equal_what_build_dataset_computes(tmp_path, tokenizer):
    from qwenloop.datacli import inspect

    long = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]}
    lines = [GOOD, "{bad", long, GOOD, "", {"instruction": "Say hi", "output": "hi"}, TOOL_RECORD]
    path = _lines(tmp_path / "d.jsonl", lines)
    tok = _with_template(tokenizer, "qwen2_5_tools")
    for settings in (dict(max_seq_len=64), dict(max_seq_len=64, truncation="drop"), dict(max_seq_len=400)):
        settings = cfg(bad_records="skip", **settings)
        built = build_dataset(path, tok, settings)
        summary, sample, report, refusal = inspect(path, tok, settings)
        tokens = summary["tokens"]
        assert refusal is None and summary["accepted"]
        assert (tokens["examples"], tokens["tokens"], tokens["target_tokens"]) == (
            len(built.dataset), sum(built.lengths), built.target_tokens)
        assert (tokens["truncated"], tokens["dropped"], summary["bad_records"]) == (built.truncated, built.dropped, built.bad_records)
        assert sum(n for _, _, n in tokens["histogram"]) == len(built.dataset) + built.dropped
    assert summary["records"] == 6 and summary["formats"] == {"messages": 4, "alpaca": 1}
    assert (summary["records_with_tools"], summary["tool_calls"], summary["tool_results"]) == (1, 3, 3)
    _, _, _, refusal = inspect(path, tok, cfg(bad_records="error"))
    assert str(refusal).startswith(f"{path}:2: malformed JSON")


def test_data_sample_marks_exactly_the_label_tokens(tmp_path, tokenizer):
    from qwenloop.datacli import CLOSE, OPEN, inspect

    tok = _with_template(tokenizer, "qwen3_tools")
    path = _lines(tmp_path / "d.jsonl", [GOOD, TOOL_RECORD])
    _, sample, _, _ = inspect(path, tok, cfg(max_seq_len=1024), sample=1)
    head, body = sample.split("\n", 1)
    assert head.startswith(f"sample: {path}:2 (")
    marked = re.findall(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), body, flags=re.S)
    assert marked == EXPECTED_TARGETS["qwen3_tools"]
    row = build_dataset(path, tok, cfg(max_seq_len=1024)).dataset[1]
    assert body.replace(OPEN, "").replace(CLOSE, "") == tok.decode(row["input_ids"])
    _, sample, _, _ = inspect(_lines(tmp_path / "b.jsonl", [GOOD, "{bad"]), tok, cfg(), sample=1)
    assert sample.startswith(f"sample: record 1 ({tmp_path / 'b.jsonl'}:2) cannot be used")


def test_qwenloop_data_command(tmp_path, tiny_model):
    path = _lines(tmp_path / "d.jsonl", [GOOD, "", "{bad", NO_ANSWER, GOOD])
    config = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, "unused.jsonl", tmp_path / "run"))
    proc = run_cli("data", path, "--config", config, "--max_seq_len", "64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    out = proc.stdout
    assert f"{path} (jsonl): 4 records, 2 bad" in out and "formats (usable records): messages 2" in out
    assert f"  {path}:3: malformed JSON" in out and f"  {path}:4: conversation has no assistant turn" in out
    assert "examples trained on: 2 (" in out and "over max_seq_len=64: 0 of 2 (0.0%)" in out
    assert "sample: " + path + ":1 (" in out and "\u27e6hi there<|im_end|>\u27e7" in out
    assert "training with bad_records: error: refused" in out
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}: 2 of 4 records cannot be used")
    proc = run_cli("data", path, "--model", tiny_model, "--bad_records", "skip", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["accepted"] and summary["bad_records"] == 2 and summary["tokens"]["examples"] == 2
    assert [where for where, _ in summary["problems"]] == [f"{path}:3", f"{path}:4"]
    assert not (tmp_path / "run").exists()
