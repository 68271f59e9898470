"""qwenloop's FSDP code on 2 real gloo ranks, driven by the repo's own accelerate FSDP configs.

accelerate refuses FSDP on CPU, so tests/fsdp_worker.py does what ``accelerator.prepare`` does, with
accelerate's own plugin (built from the environment ``accelerate launch`` derives from
accelerate_configs/fsdp.yaml or fsdp1.yaml) and accelerate's own FSDP2 preparation. Compared with a
single-process ``train()`` of the same config and global batch: losses, adapter, what a save gathers,
what each rank holds, and an exact resume from a checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, _free_port, assert_adapter_loads_whole, assert_adapters_close, base_config, load_adapter_tensors,
                      read_metrics, tensor_bytes, train_in_process, train_losses, write_yaml)

pytestmark = pytest.mark.slow

STEPS = dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=5e-3, lr_scheduler="cosine", warmup_steps=1)
QLORA = {"quantization": {"bits": 4}}
PACKED = {"packing": True, "max_seq_len": 64}
CONFIGS = ["fsdp.yaml", "fsdp1.yaml"]  # FSDP2 (the default) and FSDP1


def launcher_env(accelerate_yaml: str) -> dict:
    """The FSDP_* variables ``accelerate launch --config_file accelerate_configs/<yaml>`` gives each rank
    (accelerate's own launcher code; mixed precision left out: these runs compare fp32)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(REPO / "accelerate_configs" / accelerate_yaml), "--num_processes", "2", "unused.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_")}


def run_worker(out: Path, config: dict, accelerate_yaml: str, *worker_args: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = write_yaml(out / "config.yaml", config)
    env = {**os.environ, **launcher_env(accelerate_yaml), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "fsdp_worker.py"), str(cfg), str(out), *worker_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, train_jsonl):
    """Trainings shared by the tests of this module, each run once: ``runs(kind, extra)`` with
    kind "single" (one process, micro-batch 4) or an accelerate FSDP yaml (2 ranks, micro-batch 2)."""
    root, done = tmp_path_factory.mktemp("fsdp"), {}

    def get(kind: str, extra: dict | None = None) -> Path:
        """``extra``: settings on top of STEPS (QLORA, PACKED); runs with equal settings are shared."""
        extra = extra or {}
        key = (kind, json.dumps(extra, sort_keys=True))
        if key not in done:
            out = root / f"{kind}-{len(done)}"
            if kind == "single":
                train_in_process(base_config(tiny_model, train_jsonl, out, micro_batch_size=4, **STEPS, **extra))
            else:
                run_worker(out, base_config(tiny_model, train_jsonl, out, micro_batch_size=2, **STEPS, **extra), kind)
            done[key] = out
        return done[key]

    return get


def model_file_bytes(model_dir: str) -> int:
    from safetensors.torch import load_file

    return tensor_bytes(load_file(os.path.join(model_dir, "model.safetensors")).values())


def check_adapter(out: Path, tiny_model: str) -> None:
    """Whole and loadable by PEFT, and only the adapter gathered for the save."""
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2
    assert_adapter_loads_whole(out / "adapter", tiny_model)
    # FSDP1: only the LoRA units were summoned.
    assert info["adapter_gather_bytes"] == tensor_bytes(load_adapter_tensors(out / "adapter").values())


@pytest.mark.parametrize("accelerate_yaml", CONFIGS)
def test_fsdp_matches_single_process(runs, tiny_model, accelerate_yaml):
    out, single = runs(accelerate_yaml), runs("single")
    assert train_losses(out) == pytest.approx(train_losses(single), rel=1e-5)
    assert_adapters_close(out / "adapter", single / "adapter", rel=1e-5)
    check_adapter(out, tiny_model)

    info = json.loads((out / "run.json").read_text())
    base = model_file_bytes(tiny_model)  # the frozen base, as read from the checkpoint
    half = info["base_bytes_after_prepare"][0]
    assert info["base_bytes_after_prepare"] == [half, half] and abs(2 * half - base) <= 0.01 * base
    assert half == planned_base_bytes(tiny_model, accelerate_yaml, "none")  # qwenloop plan's base term, exactly
    if accelerate_yaml == "fsdp.yaml":
        # fsdp_cpu_ram_efficient_loading: rank 1 read nothing (meta) and got its shard from rank 0 at prepare.
        assert info["base_bytes_after_load"] == [base, 0]
    else:
        # FSDP1's broadcast (sync_module_states) needs GPU tensors: on CPU both ranks read the weights.
        assert info["base_bytes_after_load"] == [base, base]


@pytest.mark.parametrize("accelerate_yaml", CONFIGS)
def test_fsdp_resume_is_exact(runs, tmp_path, tiny_model, train_jsonl, accelerate_yaml):
    """2 steps, checkpoint (FSDPBackend's optimizer-state gather), new processes, resume (adapter load
    into the sharded model, optimizer state scattered back), 2 steps: the same as 4 steps straight."""
    straight = runs(accelerate_yaml)
    out = tmp_path / "run"
    config = base_config(tiny_model, train_jsonl, out, micro_batch_size=2, **STEPS)
    first = run_worker(out, config, accelerate_yaml, "--stop-after", "2")
    assert first["adapter_dir"] is None and os.path.isfile(os.path.join(first["last_checkpoint"], "COMPLETE"))
    second = run_worker(out, config, accelerate_yaml, "--resume", first["last_checkpoint"])
    assert second["last_checkpoint"] == first["last_checkpoint"]

    assert [m["step"] for m in read_metrics(out)] == [3, 4]
    assert train_losses(out) == train_losses(straight)[2:]  # bitwise: the same operations in the same order
    a, b = load_adapter_tensors(out / "adapter"), load_adapter_tensors(straight / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accelerate_yaml", CONFIGS)
def test_qlora_under_fsdp(runs, tiny_model, accelerate_yaml):
    """4-bit base (bnb_4bit_quant_storage = the compute dtype) sharded by FSDP: trains like one process."""
    out, single = runs(accelerate_yaml, QLORA), runs("single", QLORA)
    assert train_losses(out) == pytest.approx(train_losses(single), rel=1e-5)
    assert_adapters_close(out / "adapter", single / "adapter", rel=1e-5)
    check_adapter(out, tiny_model)
    info = json.loads((out / "run.json").read_text())
    loaded_4bit = info["base_bytes_after_load"][0]
    assert loaded_4bit < 0.6 * model_file_bytes(tiny_model)  # quantized (embeddings and norms stay fp32)
    assert info["base_bytes_after_prepare"] == [loaded_4bit // 2, loaded_4bit // 2]  # the 4-bit weights are sharded
    assert loaded_4bit // 2 == planned_base_bytes(tiny_model, accelerate_yaml, "nf4")  # the plan's NF4 shard, exactly


def planned_base_bytes(model_dir: str, accelerate_yaml: str, quant: str) -> int:
    """What ``qwenloop plan`` predicts one of 2 ranks holds of the base under this yaml's FSDP (fp32 runs:
    4-byte base, NF4 packed into fp32 storage), from the model's config.json alone."""
    from qwenloop.launch import read_launch_config
    from qwenloop.plan import states
    from qwenloop.plan.run import planned_backend
    from qwenloop.plan.shapes import spec_from_config

    backend = planned_backend(read_launch_config(REPO / "accelerate_configs" / accelerate_yaml))
    return states.base_bytes_per_rank(spec_from_config(model_dir), backend, 2, 4, quant, include_quant_state=False)


def test_packed_rows_under_fsdp2(runs, tiny_model):
    """Packed rows (position ids restarting per example, no attention mask) and the target-only head under
    FSDP2: the same losses and adapter as one process."""
    out, single = runs("fsdp.yaml", PACKED), runs("single", PACKED)
    assert train_losses(out) == pytest.approx(train_losses(single), rel=1e-5)
    assert_adapters_close(out / "adapter", single / "adapter", rel=1e-5)
    check_adapter(out, tiny_model)
