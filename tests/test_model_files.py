"""Model directories that must be refused with one line naming the file and what to do (exit code 2, no
traceback, nothing written): truncated weights (safetensors and .bin), a pickle that ``weights_only`` refuses,
custom code while ``trust_remote_code`` is false, a config.json without a tokenizer.

Every bad directory is the tiny model (``tiny_model``) with one thing broken. What can be told from the files
without loading a weight is refused by the pre-flight checks (``qwenloop.checks.training``, also run by
``qwenloop doctor``); what needs loading is refused where it loads (``qwenloop.model``), and tested there too
with the pre-flight check out of the way.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, base_config, write_yaml
from qwenloop import TrainConfig
from qwenloop.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def clone_model(tiny_model: str, dest: Path, drop=()) -> Path:
    """A copy of the tiny model directory without the files in ``drop``."""
    dest.mkdir(parents=True)
    for name in os.listdir(tiny_model):
        if name not in drop:
            shutil.copy(os.path.join(tiny_model, name), dest / name)
    return dest


def tiny_state_dict(tiny_model: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(tiny_model, "model.safetensors"))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


class MakesDirectory:
    """Unpickling this creates a directory: the proof that nothing unpickled arbitrary objects."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def pickle_model(tiny_model: str, root: Path) -> tuple[Path, Path]:
    """The tiny model as a ``pytorch_model.bin`` that also pickles training arguments and an object whose
    unpickling would create ``marker`` (what a malicious checkpoint would do instead)."""
    model = clone_model(tiny_model, root / "pickle", drop=("model.safetensors",))
    marker = root / "unpickled"
    state = {**tiny_state_dict(tiny_model), "training_args": argparse.Namespace(lr=1e-4),
             "hook": MakesDirectory(str(marker))}
    torch.save(state, model / "pytorch_model.bin")
    return model, marker


@pytest.fixture
def train_cli(tmp_path, train_jsonl, capsys, reset_accelerate):
    """``qwenloop train`` (its ``main``, in this process) on a model directory: (exit code, stderr)."""
    from qwenloop.cli import main

    def run(model_dir, **overrides):
        cfg = write_yaml(tmp_path / "train.yaml", base_config(str(model_dir), train_jsonl, tmp_path / "out",
                                                              max_steps=1, **overrides))
        code = main(["train", str(cfg)])
        return code, capsys.readouterr().err

    return run


def one_error_line(code: int, err: str, *fragments) -> str:
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------------
# What needs loading: refused in qwenloop.model
# --------------------------------------------------------------------------------------------------

def test_truncated_safetensors(tmp_path, tiny_model, train_cli):
    model = clone_model(tiny_model, tmp_path / "truncated")
    truncate(model / "model.safetensors")
    one_error_line(*train_cli(model), f"model: {model / 'model.safetensors'} cannot be read",
                   "damaged or incomplete", "download or copy it again")
    assert not (tmp_path / "out").exists()  # nothing written


def test_truncated_pytorch_bin(tmp_path, tiny_model, train_cli):
    model = clone_model(tiny_model, tmp_path / "truncated-bin", drop=("model.safetensors",))
    torch.save(tiny_state_dict(tiny_model), model / "pytorch_model.bin")
    truncate(model / "pytorch_model.bin")
    line = one_error_line(*train_cli(model), f"model: {model / 'pytorch_model.bin'} cannot be read",
                          "download or copy it again")
    assert "If you are seeing this error" not in line  # torch's paragraph of advice is cut to its first sentence
    assert not (tmp_path / "out").exists()


def test_pickle_refused_by_weights_only(tmp_path, tiny_model, train_jsonl):
    """Through the real command line: the file named, the global it needs, what to do; nothing was unpickled."""
    model, marker = pickle_model(tiny_model, tmp_path)
    cfg = write_yaml(tmp_path / "c.yaml", base_config(str(model), train_jsonl,
                                                      tmp_path / "out", max_steps=1))
    proc = subprocess.run([sys.executable, "-m", "qwenloop", "train", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    one_error_line(proc.returncode, proc.stderr, f"model: {model / 'pytorch_model.bin'} is a pickle",
                   "argparse.Namespace", "torch.load(weights_only=True)", "use the model's safetensors weights")
    assert not marker.exists(), "an object in the pickle was unpickled"
    assert not (tmp_path / "out").exists()


def test_a_plain_pytorch_bin_is_not_blamed(tmp_path, tiny_model):
    """Negative control of the search for the culprit: tensors only in a .bin, an intact safetensors file."""
    from qwenloop.model import find_unreadable_weight_file

    plain = clone_model(tiny_model, tmp_path / "plain-bin", drop=("model.safetensors",))
    torch.save(tiny_state_dict(tiny_model), plain / "pytorch_model.bin")
    assert find_unreadable_weight_file(str(plain)) is None
    assert find_unreadable_weight_file(tiny_model) is None
    # The Trainer's training_args.bin (a pickle of objects) sits beside the weights but is never loaded.
    beside = clone_model(tiny_model, tmp_path / "with-training-args")
    torch.save(argparse.Namespace(lr=1e-4), beside / "training_args.bin")
    assert find_unreadable_weight_file(str(beside)) is None
    model, marker = pickle_model(tiny_model, tmp_path)
    path, refused_pickle, detail = find_unreadable_weight_file(str(model))
    assert (path, refused_pickle) == (str(model / "pytorch_model.bin"), True) and "argparse.Namespace" in detail
    assert not marker.exists()


def test_the_damaged_shard_of_a_sharded_checkpoint_is_named(tmp_path, tiny_model):
    from safetensors.torch import save_file

    from qwenloop.model import find_unreadable_weight_file

    model = clone_model(tiny_model, tmp_path / "sharded", drop=("model.safetensors",))
    state = tiny_state_dict(tiny_model)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, model / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert find_unreadable_weight_file(str(model)) is None
    truncate(model / "model-00002-of-00002.safetensors")
    assert find_unreadable_weight_file(str(model))[:2] == (str(model / "model-00002-of-00002.safetensors"), False)


def test_an_unknown_load_error_keeps_its_traceback(tmp_path, tiny_model, monkeypatch):
    """Only a culprit found on disk becomes a one-line error: a RuntimeError from elsewhere is a bug, shown as one."""
    import transformers

    from qwenloop import model as model_lib

    def broken(*args, **kwargs):
        raise RuntimeError("something else went wrong")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="something else went wrong"):
        model_lib.load_model(TrainConfig.from_dict({"model": tiny_model, "train_file": "x.jsonl"}), plain_backend())


def plain_backend():
    """What ``load_model`` asks of a single-process backend."""
    return SimpleNamespace(mixed_precision="no", from_pretrained_kwargs=lambda quantized: {},
                           load_on_meta=lambda quantized: False)


# --------------------------------------------------------------------------------------------------
# What the files tell without loading: pre-flight checks (train() and qwenloop doctor)
# --------------------------------------------------------------------------------------------------

def custom_code_model(tiny_model: str, dest: Path, model_type: str = "qwen_custom") -> Path:
    model = clone_model(tiny_model, dest)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                                                   "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"})
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_custom_code_without_trust_remote_code(tmp_path, tiny_model, train_cli):
    model = custom_code_model(tiny_model, tmp_path / "custom")
    line = one_error_line(*train_cli(model), "trust_remote_code: is false", f"{model / 'config.json'} needs custom code",
                          "modeling_qwen.py", "set trust_remote_code: true if you trust that code")
    assert "Traceback" not in line and not (tmp_path / "out").exists()


def test_leftover_auto_map_of_a_known_model_type_is_fine(tmp_path, tiny_model):
    """Qwen2 with an auto_map left in config.json loads with transformers' own classes: no refusal."""
    from qwenloop.checks import make_context, run_checks

    model = custom_code_model(tiny_model, tmp_path / "qwen2-auto-map", model_type="qwen2")
    cfg = TrainConfig.from_dict({"model": str(model), "train_file": str(REPO / "examples" / "data" / "demo.jsonl")})
    assert not [f for f in run_checks(make_context(cfg, None)) if f.check == "remote_code"]


def test_custom_code_refused_where_it_loads_too(tmp_path, tiny_model):
    """With the pre-flight check out of the way (a hub id it cannot read, say), loading names the setting."""
    from qwenloop import model as model_lib

    cfg = TrainConfig.from_dict({"model": str(custom_code_model(tiny_model, tmp_path / "custom")), "train_file": "x.jsonl"})
    with pytest.raises(UserError, match="trust_remote_code is false; set trust_remote_code: true"):
        model_lib.load_model(cfg, plain_backend())


@pytest.mark.parametrize("kept", [(), ("tokenizer_config.json",)], ids=["no-tokenizer-files", "tokenizer-config-only"])
def test_no_tokenizer_is_not_blamed_on_the_chat_template(tmp_path, tiny_model, train_cli, kept):
    model = clone_model(tiny_model, tmp_path / "no-tokenizer", drop=[f for f in TOKENIZER_FILES if f not in kept])
    line = one_error_line(*train_cli(model), f"model: {model} has no tokenizer", "copy the tokenizer files")
    assert "chat template" not in line and "chat_template" not in line, line
    assert not (tmp_path / "out").exists()


def test_empty_tokenizer_refused_where_it_loads_too(tmp_path, tiny_model):
    """transformers builds a tokenizer of 3 special tokens from tokenizer_config.json alone: every text would
    become unknown tokens. Loading refuses it (before the chat template is looked at)."""
    from qwenloop import model as model_lib

    model = clone_model(tiny_model, tmp_path / "config-only", drop=("tokenizer.json", "chat_template.jinja"))
    cfg = TrainConfig.from_dict({"model": str(model), "train_file": "x.jsonl"})
    with pytest.raises(UserError, match="has no vocabulary, only 3 special token"):
        model_lib.load_tokenizer(cfg)
    assert model_lib.load_tokenizer(TrainConfig.from_dict({"model": tiny_model, "train_file": "x.jsonl"}))  # control
