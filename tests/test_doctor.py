"""`qwenloop doctor` and the pre-flight checks it shares with train() (qwenloop/checks/).

Every check has a config that triggers it and one that does not, written as files (training YAML,
accelerate YAML, DeepSpeed JSON) and read the way `qwenloop doctor` reads them; the checks that only a
live launch can trigger get a LaunchSpec as train() reads it. The command line reports every problem
of a run at once (exit 2), a clean run exits 0; train() stops at the same errors before it loads anything.
"""

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, _free_port, base_config, write_yaml
from qwenloop import TrainConfig
from qwenloop.checks import CheckContext, ChecksFailed, Finding, enforce, registry, run_checks
from qwenloop.doctor import doctor
from qwenloop.errors import UserError
from qwenloop.launch import LaunchSpec, read_launch_config

GOOD_DS = {
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_param_persistence_threshold": 0},
}
BIG = "Qwen/Qwen2.5-72B-Instruct"  # a hub id the planner knows as a preset (its shapes), never downloaded here


def single(**kw):
    return {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "no", **kw}


def ddp(**kw):
    return {"distributed_type": "MULTI_GPU", "num_processes": 2, "mixed_precision": "no", **kw}


def zero3(init=True, **kw):
    return {"distributed_type": "DEEPSPEED", "num_processes": 2,
            "deepspeed_config": {"deepspeed_config_file": "DS_JSON", "zero3_init_flag": init}, **kw}


def fsdp(version=2, mixed_precision="bf16", use_cpu=False, **settings):
    return {"distributed_type": "FSDP", "num_processes": 2, "mixed_precision": mixed_precision, "use_cpu": use_cpu,
            "fsdp_config": {"fsdp_version": version, "fsdp_use_orig_params": True, **settings}}


def ds(**changes):
    out = json.loads(json.dumps(GOOD_DS))
    for key, value in changes.items():
        if key == "zero_optimization":
            out[key].update(value)
        else:
            out[key] = value
    return out


# (check, level, trigger, clean): each side is a case dict: "cfg" (training-config keys on top of
# conftest.base_config), "accelerate" (YAML fields), "ds" (the DeepSpeed JSON), "gpu" (a --gpu preset),
# "missing" (a package made to look absent), "stored_quant" (a quantization_config in the model's config.json),
# "previous_run" (output_dir already holds a run's metrics.jsonl).
CASES = [
    ("config_values", "error", {"cfg": {"micro_batch_size": 0}}, {}),
    ("packing_with_grouping", "error", {"cfg": {"packing": True, "group_by_length": True}}, {"cfg": {"packing": True}}),
    ("packing_attention", "error", {"cfg": {"packing": True, "attn_implementation": "flash_attention_2", "micro_batch_size": 2}},
     {"cfg": {"packing": True, "attn_implementation": "flash_attention_2", "micro_batch_size": 1}}),
    ("paths", "error", {"cfg": {"train_file": "/nonexistent/train.jsonl"}}, {}),
    ("paths", "error", {"cfg": {"model": "./no-such-model-dir"}}, {"cfg": {"model": BIG}}),
    ("remote_code", "error", {"cfg": {"model": str(REPO / "tests" / "models" / "custom-code")}},
     {"cfg": {"model": str(REPO / "tests" / "models" / "custom-code"), "trust_remote_code": True}}),
    ("tokenizer_files", "error", {"cfg": {"model": str(REPO / "tests" / "models" / "no-tokenizer")}}, {}),
    ("resume_from", "error", {"cfg": {"resume_from": "/nonexistent/checkpoints/step-0000004"}}, {"cfg": {"resume_from": "auto"}}),
    ("previous_run", "error", {"previous_run": True}, {"previous_run": True, "cfg": {"overwrite_output_dir": True}}),
    ("previous_run", "error", {"previous_run": True}, {"previous_run": True, "cfg": {"resume_from": "auto"}}),
    ("output_dir", "error", {"cfg": {"output_dir": "/proc/version/out"}}, {}),
    ("bitsandbytes_installed", "error", {"cfg": {"quantization": {"bits": 4}}, "missing": "bitsandbytes"},
     {"cfg": {"quantization": {"bits": 4}}}),
    ("attention_kernel", "error", {"cfg": {"attn_implementation": "flash_attention_2"}, "missing": "flash_attn"}, {}),
    ("attention_kernel", "error", {"cfg": {"attn_implementation": "flex_attention"}, "accelerate": single(use_cpu=True)},
     {"cfg": {"attn_implementation": "flex_attention"}, "accelerate": single(), "gpu": "a100-80gb"}),
    ("process_group", "error", {"accelerate": fsdp(use_cpu=True)}, {"accelerate": fsdp()}),
    ("process_group", "error", {"accelerate": single(num_processes=2)}, {"accelerate": ddp()}),
    ("process_group", "error", {"accelerate": ddp(num_processes=3, num_machines=2, main_process_ip="10.0.0.1")},
     {"accelerate": ddp(num_processes=4, num_machines=2, main_process_ip="10.0.0.1")}),
    ("process_group", "warning", {"accelerate": zero3(use_cpu=True), "ds": GOOD_DS}, {"accelerate": zero3(), "ds": GOOD_DS}),
    ("precision_two_places", "error", {"accelerate": zero3(mixed_precision="fp16"), "ds": ds(bf16={"enabled": True})},
     {"accelerate": zero3(), "ds": ds(bf16={"enabled": True})}),
    ("precision_two_places", "error", {"accelerate": zero3(), "ds": ds(bf16={"enabled": True}, fp16={"enabled": True})},
     {"accelerate": zero3(), "ds": ds(bf16={"enabled": True}, fp16={"enabled": False})}),
    ("bf16_supported", "error", {"accelerate": single(mixed_precision="bf16"), "gpu": "v100-32gb"},
     {"accelerate": single(mixed_precision="bf16"), "gpu": "a100-80gb"}),
    ("bf16_supported", "error", {"accelerate": zero3(), "ds": ds(bf16={"enabled": True}), "gpu": "v100-16gb"},
     {"accelerate": zero3(), "ds": ds(bf16={"enabled": False}, fp16={"enabled": True}), "gpu": "v100-16gb"}),
    ("8bit_sharded", "error", {"cfg": {"quantization": {"bits": 8}}, "accelerate": zero3(), "ds": GOOD_DS},
     {"cfg": {"quantization": {"bits": 8}}, "accelerate": ddp()}),
    ("8bit_sharded", "error", {"cfg": {"quantization": {"bits": 8}}, "accelerate": fsdp()},
     {"cfg": {"quantization": {"bits": 4}}, "accelerate": fsdp()}),
    ("4bit_storage_dtype", "error", {"cfg": {"quantization": {"bits": 4}}, "accelerate": fsdp(), "stored_quant": "uint8"},
     {"cfg": {"quantization": {"bits": 4}}, "accelerate": fsdp(), "stored_quant": "bfloat16"}),
    ("4bit_storage_dtype", "warning", {"accelerate": ddp(), "stored_quant": "uint8"},
     {"cfg": {"quantization": {"bits": 4}}, "accelerate": ddp(), "stored_quant": "uint8"}),
    ("deepspeed_yaml_fields", "error",
     {"accelerate": zero3(deepspeed_config={"deepspeed_config_file": "DS_JSON", "zero3_init_flag": True,
                                            "gradient_accumulation_steps": 2}), "ds": GOOD_DS},
     {"accelerate": zero3(), "ds": GOOD_DS}),
    ("deepspeed_optimizer_scheduler", "error",
     {"accelerate": zero3(), "ds": ds(optimizer={"type": "AdamW", "params": {"lr": 1e-4}})}, {"accelerate": zero3(), "ds": GOOD_DS}),
    ("deepspeed_optimizer_scheduler", "error",
     {"accelerate": zero3(), "ds": ds(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}})},
     {"accelerate": zero3(), "ds": GOOD_DS}),
    ("deepspeed_auto_values", "error", {"accelerate": zero3(), "ds": ds(zero_optimization={"sub_group_size": "auto"})},
     {"accelerate": zero3(), "ds": ds(zero_optimization={"stage3_prefetch_bucket_size": "auto"})}),
    ("deepspeed_matches_training_config", "error", {"cfg": {"gradient_accumulation_steps": 2}, "accelerate": zero3(),
                                                    "ds": ds(gradient_accumulation_steps=4)},
     {"cfg": {"gradient_accumulation_steps": 4}, "accelerate": zero3(), "ds": ds(gradient_accumulation_steps=4)}),
    ("deepspeed_matches_training_config", "error", {"cfg": {"max_grad_norm": 0.5}, "accelerate": zero3(),
                                                    "ds": ds(gradient_clipping=1.0)},
     {"cfg": {"max_grad_norm": 1.0}, "accelerate": zero3(), "ds": ds(gradient_clipping=1.0)}),
    ("deepspeed_batch_sizes", "error", {"accelerate": zero3(), "ds": ds(train_batch_size=32)},  # micro 4 x 1 x 2 = 8
     {"accelerate": zero3(), "ds": ds(train_batch_size=8)}),
    ("deepspeed_batch_sizes", "error", {"accelerate": zero3(), "ds": ds(train_micro_batch_size_per_gpu=2)},
     {"accelerate": zero3(), "ds": ds(train_micro_batch_size_per_gpu=4)}),
    ("offload_adam_betas", "error",
     {"cfg": {"adam_betas": [0.9, 0.95]}, "accelerate": zero3(), "ds": ds(zero_optimization={"offload_optimizer": {"device": "cpu"}})},
     {"cfg": {"adam_betas": [0.9, 0.95]}, "accelerate": zero3(), "ds": GOOD_DS}),
    ("deepspeed_stage", "error", {"cfg": {"checkpoint_every_steps": 10}, "accelerate": zero3(), "ds": ds(zero_optimization={"stage": 2})},
     {"cfg": {"checkpoint_every_steps": 10}, "accelerate": zero3(), "ds": GOOD_DS}),
    ("deepspeed_stage", "warning", {"accelerate": zero3(), "ds": ds(zero_optimization={"stage": 2})},
     {"accelerate": zero3(), "ds": GOOD_DS}),
    ("zero3_init", "error", {"cfg": {"model": BIG}, "accelerate": zero3(init=False), "ds": GOOD_DS, "gpu": "a100-80gb"},
     {"cfg": {"model": BIG}, "accelerate": zero3(init=True), "ds": GOOD_DS, "gpu": "a100-80gb"}),
    ("zero3_init", "warning", {"accelerate": zero3(init=False), "ds": GOOD_DS}, {"accelerate": zero3(init=True), "ds": GOOD_DS}),
    ("fsdp1_use_orig_params", "error", {"accelerate": fsdp(version=1, fsdp_use_orig_params=False)},
     {"accelerate": fsdp(version=1, fsdp_use_orig_params=True)}),
    ("double_activation_checkpointing", "error", {"accelerate": fsdp(fsdp_activation_checkpointing=True)},
     {"accelerate": fsdp(fsdp_activation_checkpointing=True), "cfg": {"gradient_checkpointing": False}}),
    ("plan_fits", "error", {"cfg": {"model": BIG, "max_seq_len": 4096}, "accelerate": single(mixed_precision="bf16"), "gpu": "a100-80gb"},
     {"cfg": {"max_seq_len": 4096}, "accelerate": single(mixed_precision="bf16"), "gpu": "a100-80gb"}),
]


def case_id(case):
    return f"{case[0]}-{case[1]}"


@pytest.fixture
def no_local_gpu(monkeypatch):
    """The doctor sees only the GPU a test names with --gpu, whatever this machine has."""
    monkeypatch.setattr("qwenloop.doctor.detect_gpu", lambda: None)


@pytest.fixture
def examine(tmp_path, tiny_model, train_jsonl, monkeypatch, no_local_gpu):
    """``examine(case, name)``: the doctor's findings for the files a case describes."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def run(case: dict, name: str) -> list[Finding]:
        root = tmp_path / name
        root.mkdir()
        settings = dict(case.get("cfg", {}))
        model, data = settings.pop("model", tiny_model), settings.pop("train_file", train_jsonl)
        if "stored_quant" in case:
            model = str(prequantized_model_dir(root, tiny_model, case["stored_quant"]))
        out = settings.pop("output_dir", root / "out")
        if case.get("previous_run"):  # a finished run already in output_dir
            Path(out).mkdir(parents=True)
            (Path(out) / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        cfg = base_config(model, data, out, **settings)
        accelerate = write_accelerate(root, case["accelerate"], case.get("ds")) if "accelerate" in case else None
        missing = case.get("missing")
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda mod, *a: None if mod == missing else real_find_spec(mod, *a))
        try:
            return doctor(str(write_yaml(root / "train.yaml", cfg)), accelerate, gpu=case.get("gpu"))
        finally:
            monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)

    return run


def write_accelerate(root: Path, fields: dict, ds_json: dict | None) -> str:
    fields = json.loads(json.dumps(fields))
    section = fields.get("deepspeed_config")
    if section and section.get("deepspeed_config_file") == "DS_JSON":
        section["deepspeed_config_file"] = str(root / "ds.json")  # absolute: the test's CWD does not matter
        (root / "ds.json").write_text(json.dumps(ds_json if ds_json is not None else GOOD_DS))
    return str(write_yaml(root / "accelerate.yaml", {"compute_environment": "LOCAL_MACHINE", **fields}))


def prequantized_model_dir(root: Path, tiny_model: str, storage: str) -> Path:
    """A model directory whose config.json says the checkpoint was saved 4-bit by bitsandbytes (the checks read
    config.json only)."""
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_quant_storage": storage}
    model = root / "prequantized"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("check, level, trigger, clean", CASES, ids=[case_id(c) for c in CASES])
def test_each_check_fires_on_its_trigger_only(examine, check, level, trigger, clean):
    fired = [f for f in examine(trigger, "trigger") if f.check == check]
    assert fired, f"{check} did not fire on {trigger}"
    assert {f.level for f in fired} == {level}, fired
    for f in fired:
        assert "\n" not in f.message and ": " in f.message, f  # one line that says where
    quiet = [f for f in examine(clean, "clean") if f.check == check]
    assert not quiet, f"{check} fired on the clean case {clean}: {quiet}"


def live_launch(**kw) -> LaunchSpec:
    return LaunchSpec(**{"source": "accelerator", "backend": "single", "num_processes": 1, "num_machines": 1,
                         "mixed_precision": "no", "use_cpu": False, "launched_processes": 1, **kw})


# What only a live launch shows (inside train(): the process group accelerate formed, the GPU's compute capability).
LIVE_CASES = [
    ("process_group", dict(launch=live_launch(distributed_type="NO", launched_processes=2, use_cpu=True)),
     dict(launch=live_launch(backend="ddp", distributed_type="MULTI_CPU", num_processes=2, launched_processes=2, use_cpu=True))),
    ("process_group", dict(launch=live_launch(backend="ddp", distributed_type="MULTI_GPU", num_processes=8, launched_processes=8),
                           gpu_count=4, live=True),
     dict(launch=live_launch(backend="ddp", distributed_type="MULTI_GPU", num_processes=4, launched_processes=4),
          gpu_count=4, live=True)),
    ("bf16_supported", dict(launch=live_launch(mixed_precision="bf16"), gpu_capability=(7, 0), live=True),
     dict(launch=live_launch(mixed_precision="bf16"), gpu_capability=(8, 0), live=True)),
]


@pytest.mark.parametrize("check, trigger, clean", LIVE_CASES, ids=[c[0] for c in LIVE_CASES])
def test_live_launch_checks(check, trigger, clean):
    cfg = TrainConfig.from_dict({"model": "m", "train_file": str(REPO / "examples" / "data" / "demo.jsonl")})
    assert [f for f in run_checks(CheckContext(cfg=cfg, **trigger)) if f.check == check and f.level == "error"]
    assert not [f for f in run_checks(CheckContext(cfg=cfg, **clean)) if f.check == check]


def test_every_check_has_a_trigger_case():
    names = [fn.__name__.removeprefix("check_") for fn in registry()]
    assert len(names) == len(set(names))
    assert set(names) == {c[0] for c in CASES}


# --------------------------------------------------------------------------------------------------
# The repo's own accelerate configs, as the README runs them
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_shipped_accelerate_configs_are_clean(name, tmp_path, tiny_model, train_jsonl, monkeypatch, no_local_gpu):
    """No false alarm on the configs the README recommends (the DeepSpeed JSON paths are relative to the repo)."""
    monkeypatch.chdir(REPO)
    launch = read_launch_config(f"accelerate_configs/{name}")
    gpu = "v100-32gb" if launch.mixed_precision == "fp16" else "a100-80gb"
    cfg = write_yaml(tmp_path / "train.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out"))
    findings = doctor(str(cfg), f"accelerate_configs/{name}", gpu=gpu)
    assert not [f for f in findings if f.level == "error"], findings


def test_launch_spec_reads_what_accelerate_reads(tmp_path):
    """Precision from the DeepSpeed JSON, the JSON's path relative to the CWD (named in the error), the launcher's
    FSDP defaults, the processes the simple launcher starts."""
    spec = read_launch_config(write_accelerate(tmp_path, zero3(), ds(fp16={"enabled": True})))
    assert (spec.backend, spec.mixed_precision, spec.zero_stage, spec.zero3_init_flag, spec.gpus_per_node) == ("zero3", "fp16", 3, True, 2)
    spec = read_launch_config(write_yaml(tmp_path / "f.yaml", {"distributed_type": "FSDP", "num_processes": 4, "fsdp_config": {}}))
    assert spec.backend == "fsdp1" and spec.fsdp["use_orig_params"] is True  # accelerate launch's defaults
    assert read_launch_config(write_yaml(tmp_path / "n.yaml", single(num_processes=4))).launched_processes == 1
    with pytest.raises(UserError, match=r"u.yaml: unknown field 'num_process' .*did you mean 'num_processes'"):
        read_launch_config(write_yaml(tmp_path / "u.yaml", {"distributed_type": "MULTI_GPU", "num_process": 2}))
    relative = write_yaml(tmp_path / "r.yaml", zero3(deepspeed_config={"deepspeed_config_file": "configs/missing.json"}))
    with pytest.raises(UserError, match=r"deepspeed_config_file: configs/missing.json not found \(accelerate opens it "
                                        r"relative to the directory you launch from"):
        read_launch_config(relative)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------

def cli(capsys, *argv) -> tuple[int, str]:
    from qwenloop.cli import main

    code = main(["doctor", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_reports_every_problem_at_once(tmp_path, tiny_model, train_jsonl, capsys, no_local_gpu):
    cfg = write_yaml(tmp_path / "train.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out", packing=True,
                                                          group_by_length=True, lora={"r": 0}))
    accelerate = write_accelerate(tmp_path, fsdp(version=1, fsdp_use_orig_params=False, fsdp_activation_checkpointing=True), None)
    code, out = cli(capsys, "--config", cfg, "--accelerate-config", accelerate, "--quantization.bits", "8")
    assert code == 2, out
    for name in ("config_values", "packing_with_grouping", "8bit_sharded", "fsdp1_use_orig_params",
                 "double_activation_checkpointing"):
        assert f"error [{name}]: " in out, out
    assert "lora.r: must be >= 1" in out and "5 error(s)" in out, out


def test_cli_clean_run_exits_0(tmp_path, tiny_model, train_jsonl, capsys, no_local_gpu):
    cfg = write_yaml(tmp_path / "train.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out"))
    code, out = cli(capsys, "--config", cfg, "--accelerate-config", write_accelerate(tmp_path, ddp(), None), "--gpu", "a100-80gb")
    assert code == 0 and "no problems found" in out, out


def test_cli_warnings_only_exit_0(tmp_path, tiny_model, train_jsonl, capsys, no_local_gpu):
    cfg = write_yaml(tmp_path / "train.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out"))
    accelerate = write_accelerate(tmp_path, zero3(init=False), None)
    code, out = cli(capsys, "--config", cfg, "--accelerate-config", accelerate, "--gpu", "a100-80gb")
    assert code == 0, out
    assert "warning [zero3_init]: " in out and "error [" not in out and "1 warning(s), no errors" in out, out


def test_cli_unreadable_files_are_findings_too(tmp_path, tiny_model, capsys, no_local_gpu):
    cfg = write_yaml(tmp_path / "train.yaml", {"model": tiny_model, "train_file": str(tmp_path / "none.jsonl")})
    missing_json = write_yaml(tmp_path / "a.yaml", zero3(deepspeed_config={"deepspeed_config_file": str(tmp_path / "no.json")}))
    code, out = cli(capsys, "--config", cfg, "--accelerate-config", missing_json)
    assert code == 2
    assert "error [accelerate_config]: " in out and "no.json not found" in out, out
    assert "error [paths]: " in out and "none.jsonl: data file not found" in out, out  # still checked
    code, out = cli(capsys, "--config", write_yaml(tmp_path / "typo.yaml", {"model": "m", "learning_rat": 1}))
    assert code == 2 and "error [training_config]: " in out and "did you mean 'learning_rate'" in out, out


def test_doctor_command_end_to_end(tmp_path, tiny_model, train_jsonl):
    """The installed entry point: exit code 2 and the report on stdout."""
    cfg = write_yaml(tmp_path / "train.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out", micro_batch_size=0))
    proc = subprocess.run([sys.executable, "-m", "qwenloop", "doctor", "--config", str(cfg), "--gpu", "h100"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error [config_values]: " in proc.stdout and "micro_batch_size: must be >= 1" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "qwenloop", "doctor", "--config", str(cfg), "-x"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: qwenloop doctor: unknown option -x"), bad.stderr


# --------------------------------------------------------------------------------------------------
# train() runs the same checks, before it loads anything
# --------------------------------------------------------------------------------------------------

def test_train_stops_at_check_errors_before_loading(tmp_path, tiny_model, train_jsonl, monkeypatch, reset_accelerate):
    from qwenloop import model as model_lib, train

    def must_not_load(*args, **kwargs):
        raise AssertionError("train() loaded something before its checks stopped it")

    monkeypatch.setattr(model_lib, "load_tokenizer", must_not_load)
    monkeypatch.setattr(model_lib, "load_model", must_not_load)
    raw = base_config(tiny_model, train_jsonl, tmp_path / "out", micro_batch_size=0, attn_implementation="flash_attention_2")
    with pytest.raises(ChecksFailed) as info:
        train(TrainConfig.from_dict(raw, validate=False))  # a config built in code without validation: train() checks
    assert [f.check for f in info.value.findings] == ["config_values", "attention_kernel"]
    printed = f"error: {info.value}".splitlines()  # what the command line prints
    assert len(printed) == 2 and all(line.startswith("error: config: ") for line in printed), printed
    assert not (tmp_path / "out").exists()


def deepspeed_rank_env(accelerate_yaml: str) -> dict:
    """The environment `accelerate launch --config_file X` gives a DeepSpeed rank (accelerate's own launcher code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, precision_from_yaml = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", accelerate_yaml, "unused.py"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(
        list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_yaml else []))  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def test_train_refuses_a_deepspeed_json_with_an_optimizer(tmp_path, tiny_model, train_jsonl):
    """One DeepSpeed rank (CPU accelerator) started as `accelerate launch` starts it, with a JSON that holds an
    optimizer: `qwenloop train` exits 2 with one line, before the tokenizer, the data or a weight is read."""
    accelerate = write_accelerate(tmp_path, zero3(num_processes=1), ds(optimizer={"type": "AdamW", "params": {"lr": 1e-4}}))
    cfg = write_yaml(tmp_path / "train.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out"))
    env = {**os.environ, **deepspeed_rank_env(accelerate), "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "qwenloop", "train", str(cfg)], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "ds.json: optimizer: a DeepSpeed optimizer is defined" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "trainable parameters" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_enforce_logs_warnings_once_and_stops_at_errors(caplog):
    log = logging.getLogger("test-doctor")
    warn = Finding("warning", "zero3_init", "x.yaml: deepspeed_config.zero3_init_flag: is false; set it")
    with caplog.at_level(logging.WARNING, logger="test-doctor"):
        enforce([warn], log, main_process=True)
        enforce([warn], log, main_process=False)  # the other ranks stay quiet
    assert [r.getMessage() for r in caplog.records] == [f"{warn.message} [zero3_init]"]
    errors = [Finding("error", "a", "f.yaml: a: bad; fix a"), Finding("error", "b", "g.json: b: bad;\nfix b")]
    with pytest.raises(ChecksFailed) as info:
        enforce([warn, *errors], log, main_process=False)
    assert str(info.value) == "f.yaml: a: bad; fix a\nerror: g.json: b: bad; fix b"  # one line per error


# --------------------------------------------------------------------------------------------------
# One list of checks: nothing they say is said anywhere else
# --------------------------------------------------------------------------------------------------

MOVED_MESSAGES = [  # distinctive text of each check that used to live in config.py, distributed.py, model.py
    "8-bit base weights do not work under", "is false under FSDP1", "would be checkpointed twice",
    "would be silently replaced by", "bf16 needs 8.0+", "so the training config decides", "has nothing to group",
    "must be >= 1", "base weights need bitsandbytes", "not found; set model to a local model directory",
    "the flash-attn package is not installed",
]


def string_constants(path: Path) -> str:
    """Every string literal of a module, f-string pieces included (comments and docstrings are not raised)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return "\n".join(node.value for node in ast.walk(tree)
                     if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings)


def test_no_check_lives_in_two_places():
    sources = {p.relative_to(REPO).as_posix(): string_constants(p) for p in (REPO / "qwenloop").rglob("*.py")}
    for fragment in MOVED_MESSAGES:
        homes = [name for name, text in sources.items() if fragment in text]
        assert len(homes) == 1, (fragment, homes)
        assert homes[0].startswith(("qwenloop/checks/", "qwenloop/launch.py")), (fragment, homes)
    # The backends keep what needs a live model or engine; their refusals are gone.
    tree = ast.parse((REPO / "qwenloop" / "distributed.py").read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not functions & {"check_precision_supported", "check_quantization"}, functions
    fsdp_backend = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FSDPBackend")
    assert "configure" not in {n.name for n in fsdp_backend.body if isinstance(n, ast.FunctionDef)}
    assert "UserError" not in ast.unparse(next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                                               and n.name == "configure" and "ds_config" in ast.unparse(n)))
    assert "_check_model_path" not in (REPO / "qwenloop" / "model.py").read_text()
    assert all(fn.__module__.startswith("qwenloop.checks.") for fn in registry())


@pytest.mark.parametrize("seq, level", [(1024, None), (2048, "warning"), (4096, "warning"), (8192, "error")])
def test_plan_fits_stops_only_beyond_the_plans_margin(tmp_path, seq, level):
    """72B, ZeRO-3 (no offload) on 8x V100 32GB in fp16: 27.4 GiB at 1k tokens fits with room; 29.0 at 2k fits
    with less than the 10% margin to spare and 33.0 at 4k is over within the margin (warnings: the run may well
    fit); 8k is over by more than the margin (an error that stops the run)."""
    from dataclasses import replace

    from qwenloop import TrainConfig
    from qwenloop.checks import make_context, run_checks
    from qwenloop.launch import read_launch_config
    from qwenloop.plan.gpus import resolve_gpu

    launch = read_launch_config(REPO / "accelerate_configs" / "deepspeed_zero3_offload.yaml")
    launch = replace(launch, offload_param=False, offload_optimizer=False)  # fp16 from its JSON, 8 processes
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    cfg = TrainConfig.from_dict({"model": BIG, "train_file": str(data), "max_seq_len": seq})
    found = [f for f in run_checks(make_context(cfg, launch, gpu=resolve_gpu("v100-32gb"))) if f.check == "plan_fits"]
    assert [f.level for f in found] == ([level] if level else [])
    if level:
        assert "8x Tesla V100 32GB" in found[0].message

