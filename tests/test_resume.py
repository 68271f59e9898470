"""Runs that survive, end to end on CPU.

Exact resume: 8 steps straight == 4 steps, stopped by SIGTERM (checkpoint written), resumed, 4 more:
identical per-step metrics and bitwise-identical adapters (torch.equal), for a single process, 2-rank
DDP and 2-rank DeepSpeed ZeRO-3 (with and without parameter + optimizer offload). The stop falls
mid-epoch (5 steps per epoch: the resumed part crosses into epoch 1), with gradient accumulation 3, a shuffled dataset and LoRA dropout on (the
restored RNG matters). A SIGKILL in the middle of writing a checkpoint resumes from the previous
complete one. A NaN planted in one rank's loss is caught, skipped, counted and reported on 2 ranks.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (CONFIGS, NEEDS_CPU_ADAM, REPO, _free_port, base_config, load_adapter_tensors, read_metrics,
                      reset_accelerate_state, tensor_bytes, write_yaml)
from qwenloop import TrainConfig, train
from qwenloop import checkpoint as ckpt
from qwenloop.errors import EXIT_NONFINITE, RunStopped

# 64 examples: single 4 x 3 accumulation (16 micro-batches, 5 steps per epoch); 2 ranks 2 x 3 x 2 (the same).
COMMON = dict(max_steps=8, gradient_accumulation_steps=3, learning_rate=5e-3, lora={"dropout": 0.1}, checkpoint_every_steps=3)
COMPARED = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "skipped")
LAUNCH = {"ddp": ("ddp_2cpu.yaml", {"ACCELERATE_USE_CPU": "true"}), "zero3": ("zero3_2cpu.yaml", {"DS_ACCELERATOR": "cpu"}),
          "zero3_offload": ("zero3_offload_2cpu.yaml", {"DS_ACCELERATOR": "cpu"})}


def launch_rc(accelerate_yaml, train_yaml, env_extra, fault=None, timeout=600) -> subprocess.CompletedProcess:
    """conftest.launch, but a non-zero exit is returned, not raised (stopped runs exit non-zero)."""
    env = {**os.environ, **env_extra, "PYTHONWARNINGS": "ignore"}
    env.pop("QWENLOOP_FAULT", None)
    if fault:
        env["QWENLOOP_FAULT"] = fault
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / accelerate_yaml),
           "--main_process_port", str(_free_port()), "-m", "qwenloop", "train", str(train_yaml)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def cli_rc(train_yaml, *args, fault=None, timeout=300, preexec_fn=None) -> subprocess.CompletedProcess:
    """`qwenloop train` in a child process; a non-zero exit is returned, not raised (``preexec_fn``: e.g. a
    file-size limit from tests/fullfs.py)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("QWENLOOP_FAULT", None)
    if fault:
        env["QWENLOOP_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "qwenloop", "train", str(train_yaml), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def step_metrics(output_dir) -> list[dict]:
    return [{k: m.get(k) for k in COMPARED} for m in read_metrics(output_dir) if "loss" in m]


def assert_same_run(straight, resumed):
    assert step_metrics(resumed) == step_metrics(straight)
    assert [m["step"] for m in step_metrics(resumed)] == list(range(1, 9))
    a, b = load_adapter_tensors(straight / "adapter"), load_adapter_tensors(resumed / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- single process, in this process ---------------------------------------------------------


def straight_and_resumed(root, cfg) -> dict:
    """`cfg` run straight, and the same run stopped by SIGTERM after step 4 then resumed (in this process)."""
    cfg = {**cfg, "output_dir": str(root / "straight")}
    reset_accelerate_state()
    train(TrainConfig.from_dict(cfg))
    reset_accelerate_state()
    stopped_cfg = {**cfg, "output_dir": str(root / "stopped")}
    os.environ["QWENLOOP_FAULT"] = "sigterm:0:4"  # the real handler: this process sends itself SIGTERM
    try:
        with pytest.raises(RunStopped) as stop:
            train(TrainConfig.from_dict(stopped_cfg))
    finally:
        del os.environ["QWENLOOP_FAULT"]
        reset_accelerate_state()
    stopped_checkpoints = [s for s, _ in ckpt.list_checkpoints(root / "stopped")]
    resumed = train(TrainConfig.from_dict({**stopped_cfg, "resume_from": "auto"}))
    reset_accelerate_state()
    return {"root": root, "stop": stop.value, "stopped_checkpoints": stopped_checkpoints, "resumed": resumed, "cfg": cfg}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model, train_jsonl):
    root = tmp_path_factory.mktemp("single")
    return straight_and_resumed(root, base_config(tiny_model, train_jsonl, root / "straight", micro_batch_size=4, **COMMON))


@pytest.mark.parametrize("batching", [
    # 64 examples in 51 rows of <= 64 tokens: 3 rows x 3 accumulation, 5 steps per epoch
    {"packing": True, "max_seq_len": 64, "micro_batch_size": 3},
    {"group_by_length": True, "micro_batch_size": 4},
], ids=["packing", "group_by_length"])
def test_single_process_resume_is_exact_with(batching, tmp_path, tiny_model, train_jsonl):
    runs = straight_and_resumed(tmp_path, base_config(tiny_model, train_jsonl, tmp_path, **{**COMMON, **batching}))
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    epochs = [m["epoch"] for m in step_metrics(tmp_path / "straight")]
    assert epochs[3] == 0 and epochs[-1] >= 1, epochs  # stopped mid-epoch 0, resumed across an epoch boundary
    assert runs["resumed"].resumed_from.endswith("step-0000004")


def test_single_process_sigterm_stops_with_a_checkpoint(single):
    stop = single["stop"]
    assert stop.exit_code == 128 + signal.SIGTERM
    assert stop.checkpoint.endswith("step-0000004")
    assert "SIGTERM received" in str(stop) and "resume_from: auto" in str(stop)
    assert single["stopped_checkpoints"] == [3, 4]
    assert single["resumed"].resumed_from.endswith("step-0000004")
    assert len(single["resumed"].losses) == 4


def test_single_process_resume_is_exact(single):
    assert_same_run(single["root"] / "straight", single["root"] / "stopped")
    epochs = [m["epoch"] for m in step_metrics(single["root"] / "straight")]
    assert epochs == [0, 0, 0, 0, 0, 1, 1, 1]  # stopped mid-epoch 0, resumed across the epoch boundary


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(single, tmp_path):
    """Through the command line: killed half-way through the checkpoint of step 6 (after step-3 was complete),
    then `--resume_from auto` takes step 3, removes the partial directory, and finishes the same run."""
    cfg = write_yaml(tmp_path / "c.yaml", {**single["cfg"], "output_dir": str(tmp_path / "run")})
    killed = cli_rc(cfg, fault="kill_during_checkpoint:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = tmp_path / "run" / ckpt.CHECKPOINTS
    assert sorted(os.listdir(root)) == [".tmp-step-0000006", "step-0000003"]
    assert ckpt.find_latest(tmp_path / "run").endswith("step-0000003")
    resumed = cli_rc(cfg, "--resume_from", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-0000003" in resumed.stderr
    assert ".tmp-step-0000006" not in os.listdir(root)
    assert_same_run(single["root"] / "straight", tmp_path / "run")


# ---- 2 ranks: DDP and ZeRO-3 through accelerate launch -----------------------------------------


@pytest.fixture(scope="module", params=["ddp", "zero3", pytest.param("zero3_offload", marks=NEEDS_CPU_ADAM)])
def two_ranks(request, tmp_path_factory, tiny_model, train_jsonl):
    name = request.param
    yaml_name, env = LAUNCH[name]
    root = tmp_path_factory.mktemp(name)
    cfg = base_config(tiny_model, train_jsonl, root / "straight", micro_batch_size=2, **COMMON)
    straight = launch_rc(yaml_name, write_yaml(root / "straight.yaml", cfg), env)
    assert straight.returncode == 0, straight.stderr[-4000:]
    stopped_yaml = write_yaml(root / "stopped.yaml", {**cfg, "output_dir": str(root / "stopped")})
    stopped = launch_rc(yaml_name, stopped_yaml, env, fault="sigterm:1:4")  # only rank 1 gets the signal
    resumed = launch_rc(yaml_name, write_yaml(root / "resumed.yaml", {**cfg, "output_dir": str(root / "stopped"),
                                                                      "resume_from": "auto"}), env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return {"name": name, "root": root, "stopped": stopped, "resumed": resumed}


@pytest.mark.slow
def test_two_ranks_sigterm_on_one_rank_stops_both_with_a_checkpoint(two_ranks):
    stopped = two_ranks["stopped"]
    assert stopped.returncode != 0
    assert "stopped: SIGTERM received: checkpoint of step 4 written" in stopped.stderr, stopped.stderr[-3000:]
    info = json.loads((two_ranks["root"] / "straight" / "run.json").read_text())
    assert info["world_size"] == 2
    assert "resumed from" in two_ranks["resumed"].stderr and "step-0000004" in two_ranks["resumed"].stderr


@pytest.mark.slow
def test_two_ranks_resume_is_exact(two_ranks):
    assert_same_run(two_ranks["root"] / "straight", two_ranks["root"] / "stopped")


@pytest.mark.slow
def test_two_ranks_checkpoint_holds_no_frozen_base(two_ranks, tiny_model):
    """Under ZeRO-3 each rank writes its partition of the adapter's fp32 master weights and Adam
    moments; the checkpoint is the size of adapter + optimizer state, never of the model."""
    from safetensors.torch import load_file

    path = two_ranks["root"] / "stopped" / ckpt.CHECKPOINTS / "step-0000004"
    adapter_bytes = tensor_bytes(load_adapter_tensors(path / "adapter").values())
    model = load_file(os.path.join(tiny_model, "model.safetensors"))
    model_bytes = tensor_bytes(model.values())
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    optimizer_files = sorted(p.name for p in (path / "optimizer").iterdir())
    optimizer_bytes = 0
    for f in (path / "optimizer").iterdir():
        state = torch.load(f, weights_only=True)
        tensors = [state["fp32_flat_groups"], state["optimizer_state_dict"]["state"]] if "fp32_flat_groups" in state else [state["state"]]
        optimizer_bytes += tensor_bytes(_tensors(tensors))
    if two_ranks["name"].startswith("zero3"):
        assert optimizer_files == ["zero-rank-00000.pt", "zero-rank-00001.pt"]
        assert optimizer_bytes <= 3 * adapter_bytes + 1024  # fp32 master + 2 moments, partitioned over 2 ranks
    else:
        assert optimizer_files == ["optimizer.pt"]
        assert optimizer_bytes <= 2 * adapter_bytes + 1024
    print(f"\n{two_ranks['name']}: checkpoint {size} B, adapter {adapter_bytes} B, model {model_bytes} B")
    assert size < 4 * adapter_bytes + 96 * 1024
    assert size < model_bytes / 2


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ---- NaN sentinel on 2 ranks ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_planted_nan_on_one_rank_is_skipped_counted_and_stops_the_run(name, tmp_path, tiny_model, train_jsonl):
    """Rank 1's loss is NaN at step 3 (skipped, counted, training goes on) and from step 6 on:
    max_bad_steps 2 stops the run at step 7 with a report naming the last good checkpoint."""
    yaml_name, env = LAUNCH[name]
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, tmp_path / "run", max_steps=10,
                                                      micro_batch_size=2, gradient_accumulation_steps=2,
                                                      checkpoint_every_steps=2, max_bad_steps=2))
    proc = launch_rc(yaml_name, cfg, env, fault="nan_loss:1:3,nan_loss:1:6-")
    assert proc.returncode != 0
    assert f"exitcode  : {EXIT_NONFINITE}" in proc.stderr, proc.stderr[-3000:]
    assert "stopped: 2 consecutive optimizer steps were non-finite (max_bad_steps 2), the last at step 7" in proc.stderr
    metrics = {m["step"]: m for m in read_metrics(tmp_path / "run") if "loss" in m}
    assert sorted(metrics) == list(range(1, 8))
    assert [s for s, m in metrics.items() if m["skipped"]] == [3, 6, 7]
    assert metrics[5]["bad_steps"] == 1 and metrics[7]["bad_steps"] == 3
    assert all(torch.isfinite(torch.tensor(metrics[s]["loss"])) for s in (1, 2, 4, 5))
    assert metrics[4]["lr"] == metrics[3]["lr"]  # the skipped step did not advance the schedule
    report = json.loads((tmp_path / "run" / "nonfinite_report.json").read_text())
    assert report["step"] == 7 and report["ranks_with_nonfinite_loss"] == [1] and report["total_bad_steps"] == 3
    assert report["last_checkpoint"].endswith("step-0000004")  # step 6 was bad: no checkpoint after it
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]
    if name == "ddp":
        assert report["nonfinite_gradients"] and all("lora_" in n for n in report["nonfinite_gradients"])
    else:
        assert report["nonfinite_gradients"] is None  # partitioned inside DeepSpeed; the engine skipped the step
    assert report["loss_scale_history"] == []  # fp32: no loss scaling
