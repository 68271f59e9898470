import re
from pathlib import Path

import pytest
import yaml

from qwenloop.cli import config_reference_markdown
from qwenloop.config import TrainConfig, field_docs, parse_overrides
from qwenloop.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": "m", "train_file": "t.jsonl"}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ntrain_file: t.jsonl\nlearning_rate: 2e-4\nlora:\n  r: 8\n")
    cfg = TrainConfig.from_yaml(path, ["--lora.r", "16", "--max_steps=5", "--lora.target_modules", "[q_proj, v_proj]",
                                       "--eval_file", "null", "--report_to", "tensorboard"])
    assert cfg.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string; coerced
    assert cfg.lora.r == 16 and cfg.max_steps == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.eval_file is None and cfg.report_to == ["tensorboard"]
    assert cfg.lora.alpha == 32  # untouched defaults stay


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({**MINIMAL, "learning_rat": 1e-4}, [], r"unknown key 'learning_rat'; did you mean 'learning_rate'"),
        ({**MINIMAL, "lora": {"rank": 4}}, [], r"unknown key 'lora.rank'; valid keys: lora.r, lora.alpha"),
        (MINIMAL, ["--lora.alhpa", "4"], r"--lora.alhpa: unknown key 'lora.alhpa'; did you mean 'lora.alpha'"),
        (MINIMAL, ["--max_step", "4"], r"did you mean 'max_steps'"),
        (MINIMAL, ["--max_steps", "four"], r"max_steps: expected an integer, got 'four'"),
        (MINIMAL, ["--format", "alpacca"], r"format: 'alpacca' is not one of .*did you mean 'alpaca'"),
        (MINIMAL, ["--truncation", "cut"], r"truncation: 'cut' is not one of"),
        (MINIMAL, ["--micro_batch_size", "0"], r"micro_batch_size: must be >= 1"),
        (MINIMAL, ["--lora.dropout", "1.5"], r"lora.dropout: must be in \[0, 1\)"),
        (MINIMAL, ["--max_steps"], r"--max_steps needs a value"),
        ({"train_file": "t.jsonl"}, [], r"model: is required"),
        ({**MINIMAL, "gradient_checkpointing": "yes"}, [], r"gradient_checkpointing: expected true or false"),
        ({**MINIMAL, "lora": 3}, [], r"lora: expected a mapping"),
        (MINIMAL, ["--packing", "true", "--group_by_length", "true"], r"group_by_length: has nothing to group when packing is on"),
        (MINIMAL, ["--peak_tflops", "0"], r"peak_tflops: must be > 0"),
        (MINIMAL, ["--attn_implementation", "flash"], r"attn_implementation: 'flash' is not one of"),
        (MINIMAL, ["--packing", "true", "--attn_implementation", "flash_attention_2", "--micro_batch_size", "2"],
         r"micro_batch_size: is 2, but packing with attn_implementation='flash_attention_2' and 2 rows per micro-batch "
         r"would let examples attend to each other .*set micro_batch_size: 1"),
    ],
)
def test_bad_config_is_one_clear_line(raw, overrides, message):
    with pytest.raises(UserError) as info:
        TrainConfig.from_dict(raw, overrides)
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: m\ntrain_file: [unclosed\nseed: 1\n")
    with pytest.raises(UserError, match=r"broken.yaml:\d+: not valid YAML"):
        TrainConfig.from_yaml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_overrides_stay_text_until_the_field_type_reads_them():
    assert parse_overrides(["--a", "true", "--b", "3", "--c.d", "x"]) == [("a", "true"), ("b", "3"), ("c.d", "x")]
    cfg = TrainConfig.from_dict(MINIMAL, ["--packing", "true", "--max_steps", "3", "--quantization.bits", "4",
                                          "--warmup_ratio", "0.1", "--gradient_checkpointing", "off"])
    assert (cfg.packing, cfg.max_steps, cfg.quantization.bits, cfg.warmup_ratio, cfg.gradient_checkpointing) == (True, 3, 4, 0.1, False)
    assert TrainConfig.from_dict(MINIMAL, ["--lora", "{r: 8, alpha: 16}"]).lora.alpha == 16  # a whole group, as YAML


# --- issue 10, item 9: a value is read by its field's type, never by YAML 1.1's guesses -----------------

YAML_11_TRAPS = ["12:30", "2024_01", "0777", "1e3", "yes", "null_run", "2024-01-01", "0x1F", "+1", ".5"]


@pytest.mark.parametrize("text", YAML_11_TRAPS)
def test_a_string_field_takes_the_command_line_text_as_given(text):
    cfg = TrainConfig.from_dict(MINIMAL, ["--output_dir", text, "--eval_file", text, f"--resume_from={text}"])
    assert (cfg.output_dir, cfg.eval_file, cfg.resume_from) == (text, text, text)
    assert type(cfg.output_dir) is str  # a plain str: yaml.safe_dump writes config.yaml from it


@pytest.mark.parametrize("text", YAML_11_TRAPS)
def test_a_string_field_takes_the_yaml_text_as_written(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\ntrain_file: t.jsonl\noutput_dir: {text}\nlora:\n  target_modules: [q_proj, {text}]\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.output_dir == text and cfg.lora.target_modules == ["q_proj", text]
    # config.yaml written from it reads back the same (safe_dump quotes what YAML would misread)
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))).output_dir == text


def test_lists_on_the_command_line_keep_their_items_text():
    cfg = TrainConfig.from_dict(MINIMAL, ["--lora.target_modules", '[q_proj, "v proj", 0777]', "--report_to", "tensorboard"])
    assert cfg.lora.target_modules == ["q_proj", "v proj", "0777"] and cfg.report_to == ["tensorboard"]
    with pytest.raises(UserError, match=r"lora.target_modules: '\[q_proj, v_proj' is not a list; write it as \[a, b\]"):
        TrainConfig.from_dict(MINIMAL, ["--lora.target_modules", "[q_proj, v_proj"])


def test_null_on_the_command_line_only_for_optional_fields():
    cfg = TrainConfig.from_dict({**MINIMAL, "eval_file": "e.jsonl"}, ["--eval_file", "null", "--output_dir", "null"])
    assert cfg.eval_file is None and cfg.output_dir == "null"


@pytest.mark.parametrize("text, value", [("0777", 777), ("1_000", 1000), ("1e3", 1000), ("-0", 0)])
def test_integers_are_read_as_written(text, value):
    """YAML 1.1 reads 0777 as octal 511: a seed or a step count is what the user wrote."""
    assert TrainConfig.from_dict(MINIMAL, ["--max_steps", text]).max_steps == value


@pytest.mark.parametrize("text", ["12:30", "0x10", "1.5", "seven", "1e400"])
def test_integer_field_refuses_what_is_not_one(text):
    with pytest.raises(UserError, match=rf"max_steps: expected an integer, got '?{re.escape(text)}"):
        TrainConfig.from_dict(MINIMAL, ["--max_steps", text])


def test_integers_in_a_yaml_file_are_read_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ntrain_file: t.jsonl\nseed: 0777\nlearning_rate: 2e-4\nquantization: {bits: 4}\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.seed == 777 and cfg.learning_rate == pytest.approx(2e-4) and cfg.quantization.bits == 4


# --- item 10: `~` is expanded in every path field --------------------------------------------------

PATH_FIELDS = ["model", "train_file", "eval_file", "output_dir", "resume_from", "chat_template"]


def test_home_is_expanded_in_every_path_field(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "t").mkdir(parents=True)
    (home / "t" / "chat.jinja").write_text("{{ messages }}")
    monkeypatch.setenv("HOME", str(home))
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{key}: ~/t/{'chat.jinja' if key == 'chat_template' else key}\n" for key in PATH_FIELDS))
    cfg = TrainConfig.from_yaml(path)
    for key in PATH_FIELDS:
        assert getattr(cfg, key) == str(home / "t" / ("chat.jinja" if key == "chat_template" else key)), key
    assert TrainConfig.from_dict(MINIMAL, ["--output_dir", "~/runs/a"]).output_dir == str(home / "runs" / "a")
    assert TrainConfig(output_dir="~/runs/b").output_dir == str(home / "runs" / "b")  # built in code, too
    assert TrainConfig.from_dict(MINIMAL, ["--model", "Qwen/Qwen2.5-7B"]).model == "Qwen/Qwen2.5-7B"  # a hub id stays


def test_unexpandable_home_is_refused():
    with pytest.raises(UserError, match=r"output_dir: '~no-such-user-qwenloop/x' cannot be expanded .*write the full path"):
        TrainConfig.from_dict(MINIMAL, ["--output_dir", "~no-such-user-qwenloop/x"])


# --- item 11: numbers in range, files that parse, no duplicate keys ---------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["--seed", "-1"], r"seed: must be in \[0, 4294967295\]"),
    (["--seed", str(2**32)], r"seed: must be in \[0, 4294967295\] \(2\*\*32 - 1\), got 4294967296"),
    (["--weight_decay", ".nan"], r"weight_decay: must be >= 0 and finite, got nan"),
    (["--weight_decay", "-0.1"], r"weight_decay: must be >= 0 and finite"),
    (["--max_grad_norm", ".nan"], r"max_grad_norm: must be >= 0 and finite \(0 disables clipping\), got nan"),
    (["--max_grad_norm", "inf"], r"max_grad_norm: must be >= 0 and finite"),
    (["--learning_rate", ".inf"], r"learning_rate: must be > 0 and finite, got inf"),
    (["--learning_rate", "nan"], r"learning_rate: must be > 0 and finite, got nan"),
    (["--peak_tflops", ".inf"], r"peak_tflops: must be > 0 and finite"),
    (["--warmup_ratio", ".nan"], r"warmup_ratio: must be in \[0, 1\), got nan"),
    (["--lora.dropout", ".nan"], r"lora.dropout: must be in \[0, 1\), got nan"),
    (["--adam_betas", "[0.9, .nan]"], r"adam_betas: must be two numbers in \[0, 1\)"),
    (["--lora.alpha", "0"], r"lora.alpha: must be >= 1 \(the update is scaled by alpha / r: 0 trains nothing\), got 0"),
    (["--max_steps", ".nan"], r"max_steps: expected an integer, got '.nan'"),
])
def test_out_of_range_numbers_name_the_key_and_the_range(overrides, message):
    with pytest.raises(UserError) as info:
        TrainConfig.from_dict(MINIMAL, overrides)
    assert "\n" not in str(info.value) and re.search(message, str(info.value)), str(info.value)


def test_doctor_lists_every_out_of_range_number_at_once(tmp_path):
    from qwenloop.checks.training import config_problems

    cfg = TrainConfig.from_dict(MINIMAL, ["--seed", "-1", "--weight_decay", ".nan", "--max_grad_norm", ".nan",
                                          "--lora.alpha", "0"], validate=False)
    problems = " | ".join(config_problems(cfg, "c.yaml"))
    for key in ("seed", "weight_decay", "max_grad_norm", "lora.alpha"):
        assert f"c.yaml: {key}: must be" in problems, problems


@pytest.mark.parametrize("text, message", [
    ("model: m\ntrain_file: t.jsonl\nmodel: other\n", r"c.yaml:3: key 'model' is set twice \(first at line 1\)"),
    ("model: m\ntrain_file: t.jsonl\nlora:\n  r: 8\n  alpha: 16\n  r: 4\n", r"c.yaml:6: key 'lora.r' is set twice \(first at line 4\)"),
    ("model: m\ntrain_file: t.jsonl\nlora: {r: 8, r: 4}\n", r"c.yaml:3: key 'lora.r' is set twice"),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message + r".*delete one of them"):
        TrainConfig.from_yaml(path)


def test_non_utf8_yaml_names_the_line_and_byte(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: m\ntrain_file: t.jsonl\noutput_dir: runs/caf\xe9\n")
    with pytest.raises(UserError, match=r"c.yaml:3: not UTF-8 text \(byte offset 49: 0xe9\); save the file as UTF-8"):
        TrainConfig.from_yaml(path)
    path.write_bytes(b"\xef\xbb\xbfmodel: m\ntrain_file: t.jsonl\n")  # a UTF-8 byte-order mark is fine
    assert TrainConfig.from_yaml(path).model == "m"


# --- item 12: a chat_template that looks like a path must exist --------------------------------------

def test_chat_template_path_that_does_not_exist_is_refused(tmp_path):
    missing = str(tmp_path / "templates" / "chatml.jinja")
    with pytest.raises(UserError, match=rf"chat_template: file '{re.escape(missing)}' not found.*fix the path"):
        TrainConfig.from_dict(MINIMAL, ["--chat_template", missing])
    with pytest.raises(UserError, match=r"chat_template: file 'chatml.jinja' not found \(relative paths are read from"):
        TrainConfig.from_dict({**MINIMAL, "chat_template": "chatml.jinja"})


def test_chat_template_as_text_or_as_an_existing_file(tmp_path):
    from qwenloop.chat_template import QWEN_CHAT_TEMPLATE, load_chat_template

    template = tmp_path / "chatml.jinja"
    template.write_text(QWEN_CHAT_TEMPLATE)
    for value in (QWEN_CHAT_TEMPLATE, str(template)):
        cfg = TrainConfig.from_dict({**MINIMAL, "chat_template": value})
        assert load_chat_template(cfg.chat_template) == QWEN_CHAT_TEMPLATE
    # a template on the command line is the text as given (YAML would read `{{` as a mapping)
    assert TrainConfig.from_dict(MINIMAL, ["--chat_template", "{{ messages[0]['content'] }}"]).chat_template == "{{ messages[0]['content'] }}"


def test_chat_template_file_under_home_reaches_the_tokenizer(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from qwenloop.chat_template import QWEN_CHAT_TEMPLATE
    from qwenloop.data import ensure_chat_template

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "chatml.jinja").write_text(QWEN_CHAT_TEMPLATE)
    cfg = TrainConfig.from_dict({**MINIMAL, "chat_template": "~/chatml.jinja"})
    tokenizer = SimpleNamespace(chat_template=None)
    ensure_chat_template(tokenizer, "m", cfg.chat_template)  # what model.py does with it
    assert tokenizer.chat_template == QWEN_CHAT_TEMPLATE


@pytest.mark.parametrize("make, message", [
    (lambda d: d, r"cannot read the template file .*it is a directory"),
    (lambda d: (d / "t.txt").write_text("You are a helpful assistant.") and d / "t.txt", r"the file .*t.txt.* holds no Jinja tag"),
    (lambda d: (d / "t.jinja").write_bytes(b"{{ caf\xe9 }}") and d / "t.jinja", r"cannot read the template file .*not UTF-8"),
])
def test_chat_template_file_that_cannot_be_a_template(tmp_path, make, message):
    with pytest.raises(UserError, match="chat_template: " + message):
        TrainConfig.from_dict({**MINIMAL, "chat_template": str(make(tmp_path))})


def test_every_field_documented():
    rows = field_docs()
    keys = [r[0] for r in rows]
    for required in ["model", "train_file", "eval_file", "output_dir", "max_steps", "num_epochs", "micro_batch_size",
                     "gradient_accumulation_steps", "learning_rate", "seed", "max_seq_len", "format", "lora.r",
                     "lora.target_modules", "quantization.bits"]:
        assert required in keys
    undocumented = [r[0] for r in rows if not r[3]]
    assert not undocumented, undocumented


def test_readme_config_reference_is_current():
    """The README's reference table is generated from the dataclass; regenerate with `qwenloop config-reference`."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert config_reference_markdown(field_docs()) in readme, "README config reference is stale: paste `qwenloop config-reference`"


def test_example_configs_load():
    for path in sorted((REPO / "examples" / "configs").glob("*.yaml")):
        TrainConfig.from_yaml(path)
