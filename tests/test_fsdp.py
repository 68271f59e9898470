"""qwenloop's FSDP code (wrap policy, adapter gather, save) on 2 real gloo ranks with torch FSDP2 and
FSDP1, compared with a single-process `train()` of the same config and global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (REPO, _free_port, assert_adapters_close, base_config, load_adapter_tensors, train_in_process,
                      train_losses, write_yaml)
from qwenloop.adapter import verify_adapter

pytestmark = pytest.mark.slow

STEPS = dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=5e-3, lr_scheduler="cosine", warmup_steps=1)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model, train_jsonl):
    out = tmp_path_factory.mktemp("fsdp") / "single"
    train_in_process(base_config(tiny_model, train_jsonl, out, micro_batch_size=4, **STEPS))
    return out


def run_fsdp(tmp_path, tiny_model, train_jsonl, version: int) -> Path:
    out = tmp_path / f"fsdp{version}"
    out.mkdir()
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, out, micro_batch_size=2, **STEPS))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "fsdp_worker.py"), str(cfg), str(version), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.mark.parametrize("version", [2, 1])
def test_fsdp_matches_single_process(tmp_path, tiny_model, train_jsonl, single, version):
    out = run_fsdp(tmp_path, tiny_model, train_jsonl, version)
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2
    assert train_losses(out) == pytest.approx(train_losses(single), rel=1e-5)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenloop.model import expected_adapter_shapes

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out / "adapter"))
    verify_adapter(str(out / "adapter"), expected_adapter_shapes(loaded))  # full shapes, not rank 0's shard
    assert_adapters_close(out / "adapter", single / "adapter", rel=1e-5)
    # Only the adapter crossed the wire for the save (FSDP1: only the LoRA units were summoned).
    adapter_bytes = sum(t.numel() * t.element_size() for t in load_adapter_tensors(out / "adapter").values())
    assert info["adapter_gather_bytes"] == adapter_bytes


def test_cpu_ram_efficient_loading_reads_weights_on_rank0_only(tiny_model):
    """FSDP cpu-ram-efficient loading: rank 0 holds the base, rank 1 only its shape on the meta device
    (FSDP fills it from rank 0 at prepare), with real buffers on both."""
    import re

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "fsdp_load_worker.py"), tiny_model]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = {int(m[0]): tuple(map(int, m[1:])) for m in
             re.findall(r"RANK (\d) BASE_BYTES (\d+) META_PARAMS (\d+) REAL_BUFFERS (\d+)", proc.stdout)}
    from safetensors.torch import load_file

    base_bytes = sum(t.numel() * t.element_size() for t in load_file(os.path.join(tiny_model, "model.safetensors")).values())
    (bytes0, meta0, buffers0), (bytes1, meta1, buffers1) = ranks[0], ranks[1]
    assert bytes0 == base_bytes and meta0 == 0
    assert bytes1 == 0 and meta1 > 0
    assert buffers0 == buffers1 > 0
