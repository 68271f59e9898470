import re
from pathlib import Path

import pytest

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


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["--a", "true", "--b", "3", "--c.d", "x"]) == [("a", True), ("b", 3), ("c.d", "x")]


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
