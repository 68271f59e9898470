"""Bad input through the real entry points: exit code 2, one line `error: ...`, no traceback, and
nothing already written is touched."""

import importlib.util
import re

import pytest

from conftest import REPO, base_config, run_cli, write_yaml
from qwenloop import TrainConfig


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_missing_model_path(tmp_path, train_jsonl):
    cfg = write_yaml(tmp_path / "c.yaml", base_config(str(tmp_path / "no-such-model"), train_jsonl, tmp_path / "out"))
    assert_clean_error(run_cli("train", cfg), "model: directory", "no-such-model", "not found")
    assert not (tmp_path / "out").exists()


def test_target_module_typo(tmp_path, tiny_model, train_jsonl):
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out",
                                                       lora={"target_modules": ["q_proj", "v_prj"]}))
    assert_clean_error(run_cli("train", cfg), "lora.target_modules: 'v_prj' matches no module", "did you mean 'v_proj'")


def test_malformed_data_line_via_cli(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{broken\n')
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, str(data), tmp_path / "out"))
    assert_clean_error(run_cli("train", cfg), "d.jsonl:2: malformed JSON")


def test_unavailable_attention_kernel_via_cli(tmp_path, tiny_model, train_jsonl):
    """flash-attn is not installed here (and needs a GPU): one line naming the setting, not a traceback."""
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out", attn_implementation="flash_attention_2"))
    assert_clean_error(run_cli("train", cfg), "attn_implementation: flash_attention_2 cannot be used here", "set attn_implementation: sdpa")
    assert not (tmp_path / "out" / "adapter").exists()


def test_unknown_override_via_cli(tmp_path, tiny_model, train_jsonl):
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out"))
    assert_clean_error(run_cli("train", cfg, "--learning-rat", "1"), "did you mean 'learning_rate'")


def test_previous_run_is_refused_and_left_intact(tmp_path, tiny_model, train_jsonl):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"precious")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, out))
    assert_clean_error(run_cli("train", cfg), "output_dir:", "already holds a previous run", "overwrite_output_dir: true")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"precious"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.jsonl"]


def test_finetune_example_passes_errors_through(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "examples" / "finetune.py"), "--config", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True, cwd=REPO)
    assert_clean_error(proc, "config file not found")


def registry_errors(cfg, launch, **context) -> list[str]:
    """The error messages of the pre-flight checks (``qwenloop.checks``: run by train() and qwenloop doctor)."""
    from qwenloop.checks import CheckContext, run_checks

    return [f.message for f in run_checks(CheckContext(cfg=cfg, launch=launch, **context)) if f.level == "error"]


def live_launch(**kw):
    """A launch as read from a live Accelerator (``LaunchSpec.source == "accelerator"``)."""
    from qwenloop.launch import LaunchSpec

    return LaunchSpec(**{"source": "accelerator", "backend": "single", "num_processes": 1, "num_machines": 1,
                         "mixed_precision": "no", "use_cpu": False, **kw})


MINIMAL = {"model": "m", "train_file": str(REPO / "examples" / "data" / "demo.jsonl")}


def test_bf16_on_a_gpu_without_bf16():
    cfg = TrainConfig.from_dict(MINIMAL)
    bf16 = live_launch(mixed_precision="bf16")
    v100 = registry_errors(cfg, bf16, gpu_capability=(7, 0), live=True)
    assert any(re.search("compute capability 7.0 .*use mixed_precision: fp16", m) for m in v100), v100
    assert not any("bf16" in m for m in registry_errors(cfg, bf16, gpu_capability=(8, 0), live=True))  # A100: fine
    assert not any("bf16" in m for m in registry_errors(cfg, live_launch(mixed_precision="fp16"), gpu_capability=(7, 0)))
    assert not any("bf16" in m for m in registry_errors(cfg, live_launch(mixed_precision="bf16", use_cpu=True)))  # CPU


def test_quantization_without_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for bits in (4, 8):
        cfg = TrainConfig.from_dict({**MINIMAL, "quantization": {"bits": bits}})
        errors = registry_errors(cfg, live_launch())
        assert any(re.search(f"{bits}-bit base weights need bitsandbytes.*pip install 'qwenloop\\[bnb\\]'", m)
                   for m in errors), errors


def test_8bit_refused_under_sharding_backends():
    cfg = TrainConfig.from_dict({**MINIMAL, "quantization": {"bits": 8}})
    zero3 = registry_errors(cfg, live_launch(backend="zero3", num_processes=2, ds_config={"zero_optimization": {"stage": 3}},
                                             zero_stage=3, distributed_type="DEEPSPEED", launched_processes=2))
    assert any(re.search("8-bit base weights do not work under DeepSpeed ZeRO-3.*bits: 4", m) for m in zero3), zero3
    fsdp = registry_errors(cfg, live_launch(backend="fsdp2", num_processes=2, fsdp={"version": 2, "use_orig_params": True},
                                            distributed_type="FSDP", launched_processes=2))
    assert any("8-bit base weights do not work under FSDP" in m for m in fsdp), fsdp
    assert not any("8-bit" in m for m in registry_errors(cfg, live_launch(backend="ddp", num_processes=2,
                                                                          distributed_type="MULTI_GPU", launched_processes=2)))


def ds_launch(ds_config: dict):
    return live_launch(backend="zero3", num_processes=2, ds_config=ds_config, zero_stage=3, distributed_type="DEEPSPEED",
                       launched_processes=2, offload_optimizer="offload_optimizer" in ds_config["zero_optimization"])


def test_custom_betas_refused_under_optimizer_offload():
    from qwenloop.distributed import DeepSpeedBackend

    ds_config = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    cfg = TrainConfig.from_dict({**MINIMAL, "adam_betas": [0.9, 0.95]})
    errors = registry_errors(cfg, ds_launch(ds_config))
    assert any(re.search(r"adam_betas: \[0.9, 0.95\] would be silently replaced", m) for m in errors), errors
    assert not any("adam_betas" in m for m in registry_errors(TrainConfig.from_dict(MINIMAL), ds_launch(ds_config)))
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
    backend.ds_config = ds_config
    backend.configure(TrainConfig.from_dict(MINIMAL))  # configure fills the "auto" entries from the training config
    assert backend.ds_config["gradient_clipping"] == 1.0 and backend.ds_config["gradient_accumulation_steps"] == 1


def test_deepspeed_json_that_contradicts_the_training_config():
    ds_config = {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4}
    cfg = TrainConfig.from_dict({**MINIMAL, "gradient_accumulation_steps": 2})
    errors = registry_errors(cfg, ds_launch(ds_config))
    assert any(re.search('gradient_accumulation_steps is 4 but the training config says 2.*"auto"', m) for m in errors), errors


@pytest.mark.parametrize("settings, message", [
    (dict(fsdp_version=1, use_orig_params=False), "fsdp_use_orig_params is false under FSDP1; LoRA needs fsdp_use_orig_params: true"),
    (dict(fsdp_version=2, activation_checkpointing=True), "fsdp_activation_checkpointing is true and the training config's gradient_checkpointing"),
])
def test_fsdp_settings_that_break_lora_are_refused(settings, message):
    """accelerate's own FSDP plugin with the setting at fault, read as train() reads it; the fixed setting passes."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from qwenloop.launch import launch_from_accelerator

    def launch(**kw):
        plugin = FullyShardedDataParallelPlugin(**kw)
        return launch_from_accelerator(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="bf16",
                                                       num_processes=2, device="cuda"))

    cfg = TrainConfig.from_dict(MINIMAL)  # gradient_checkpointing: true by default
    assert any(message in m for m in registry_errors(cfg, launch(**settings))), registry_errors(cfg, launch(**settings))
    fixed = {**settings, **{k: not v for k, v in settings.items() if isinstance(v, bool)}}
    assert registry_errors(cfg, launch(**fixed)) == []


# --- issue 10: config hardening (items 9-12), through `qwenloop train` ----------------------------------

@pytest.mark.parametrize("overrides, fragments", [
    (["--seed", "-1"], ["seed: must be in [0, 4294967295]", "got -1"]),
    (["--seed", str(2**32)], ["seed: must be in [0, 4294967295]", f"got {2**32}"]),
    (["--weight_decay", ".nan"], ["weight_decay: must be >= 0 and finite, got nan"]),
    (["--max_grad_norm", ".nan"], ["max_grad_norm: must be >= 0 and finite (0 disables clipping), got nan"]),
    (["--lora.alpha", "0"], ["lora.alpha: must be >= 1", "0 trains nothing"]),
])
def test_out_of_range_value_via_cli(tmp_path, overrides, fragments):
    cfg = write_yaml(tmp_path / "c.yaml", base_config("m", "t.jsonl", tmp_path / "out"))
    assert_clean_error(run_cli("train", cfg, *overrides), "c.yaml: ", *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragments", [
    (b"model: m\ntrain_file: t.jsonl\noutput_dir: caf\xe9\n", ["c.yaml:3: not UTF-8 text (byte offset 44: 0xe9)", "save the file as UTF-8"]),
    (b"model: m\ntrain_file: t.jsonl\nlora:\n  r: 8\n  r: 64\n", ["c.yaml:5: key 'lora.r' is set twice (first at line 4)"]),
], ids=["not-utf8", "duplicate-key"])
def test_unreadable_config_file_via_cli(tmp_path, content, fragments):
    (tmp_path / "c.yaml").write_bytes(content)
    assert_clean_error(run_cli("train", tmp_path / "c.yaml"), *fragments)


def test_missing_chat_template_file_is_named_via_cli(tmp_path, tiny_model, train_jsonl):
    """It used to be taken as the template text, and the error that followed blamed max_seq_len."""
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out",
                                                       chat_template=str(tmp_path / "templates" / "chatml.jinja")))
    line = assert_clean_error(run_cli("train", cfg), "chat_template: file", "chatml.jinja' not found", "fix the path")
    assert "max_seq_len" not in line
    assert not (tmp_path / "out").exists()


def test_home_in_output_dir_is_expanded_via_cli(tmp_path, tiny_model, train_jsonl, monkeypatch):
    """`output_dir: ~/run` is $HOME/run (here holding a previous run, so it is refused), never `./~/run`."""
    home, launch_dir = tmp_path / "home", tmp_path / "launch"
    (home / "run").mkdir(parents=True)
    (home / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    launch_dir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout's qwenloop, run from another directory
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, "~/run", max_steps=1))
    assert_clean_error(run_cli("train", cfg, cwd=launch_dir), f"output_dir: {home / 'run'} already holds a previous run")
    assert list(launch_dir.iterdir()) == []  # no directory named `~`
    assert (home / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n'
