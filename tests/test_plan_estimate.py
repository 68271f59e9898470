"""The planner's verdict, buffers, time, advice and command line (``qwenloop/plan/{estimate,buffers,timing,advice,cli}.py``).

The byte terms themselves are checked against real tensors in test_plan_states.py / test_plan_activations.py;
here: that the plan combines them as documented, that each backend's borrowed memory follows the library's
rule, that advice and search return what they claim, and that the README's table is the planner's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from qwenloop.errors import UserError
from qwenloop.plan import advice, buffers, states
from qwenloop.plan.estimate import PlanRequest, estimate
from qwenloop.plan.gpus import resolve_gpu
from qwenloop.plan.shapes import PRESETS

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
Q72, Q7, Q05 = PRESETS["qwen2.5-72b"], PRESETS["qwen2.5-7b"], PRESETS["qwen2.5-0.5b"]
V100, A100 = resolve_gpu("v100-32gb"), resolve_gpu("a100-80gb")


def req(**kw) -> PlanRequest:
    base = dict(model=Q72, gpu=V100, backend="zero3", gpus_per_node=8, precision="fp16", seq_len=2048)
    return PlanRequest(**{**base, **kw})


# --- how the plan combines its terms ------------------------------------------------------------

def test_required_is_allocated_plus_overhead_and_the_verdict_agrees():
    for r in (req(), req(backend="fsdp2", seq_len=4096), req(quant="nf4")):
        p = estimate(r)
        assert p.peak_allocated == sum(p.gpu_terms.values())
        assert p.required == p.peak_allocated + sum(p.overhead.values())
        assert p.overhead["fragmentation"] == int(buffers.FRAGMENTATION * p.peak_allocated)
        assert p.spare == V100.memory_bytes - p.required
        assert ("fits on" in p.verdict) == p.fits == (p.spare >= 0)


def test_base_shard_term_is_the_states_prediction():
    for backend in ("zero3", "fsdp2", "fsdp1", "ddp"):
        for quant in ("none", "nf4"):
            p = estimate(req(backend=backend, quant=quant))
            expected = states.base_bytes_per_rank(Q72, backend, 8, 2, quant, include_quant_state=False)
            assert p.gpu_terms["base shard"] == expected
            if quant == "nf4":
                assert p.gpu_terms["quant state"] == states.base_bytes_per_rank(Q72, backend, 8, 2, quant) - expected


def test_offload_moves_the_base_and_optimizer_to_the_host():
    on, off = estimate(req(offload_param=True, offload_optimizer=True)), estimate(req())
    assert "base shard" not in on.gpu_terms and on.gpu_terms.get("lora weights+grads+adam", 0) == 0
    whole = states.base_param_bytes(Q72, 2, "none")
    assert on.host_terms["training"] >= whole  # 8 ranks x 1/8 of the base each, plus the LoRA states
    assert off.host_terms["training"] == 0
    assert on.required < off.required and on.time.step_s > off.time.step_s


def test_sharding_quantization_checkpointing_and_the_target_head_each_save_memory():
    base = estimate(req(seq_len=4096))
    assert estimate(req(seq_len=4096, backend="ddp")).required > base.required  # 145 GB of base per GPU
    assert estimate(req(seq_len=4096, quant="nf4")).required < base.required
    assert estimate(req(seq_len=4096, checkpointing=False)).gpu_terms["saved activations"] > 10 * base.gpu_terms["saved activations"]
    full = estimate(req(model=Q7, gpu=A100, backend="single", gpus_per_node=1, precision="bf16", seq_len=8192, target_head=False))
    ours = estimate(req(model=Q7, gpu=A100, backend="single", gpus_per_node=1, precision="bf16", seq_len=8192))
    assert full.peak_allocated - ours.peak_allocated > 8192 * Q7.vocab_size * 2  # at least the bf16 logits
    assert estimate(req(seq_len=4096, attn="eager")).required > base.required


def test_the_peak_is_the_larger_of_backward_and_the_optimizer_step():
    """A long sequence peaks in backward (activations and gathered parameters); the terms reported are that
    moment's, and their sum is at least the optimizer step's (the states with ZeRO-3's fp32 step gradient)."""
    p = estimate(req(seq_len=4096))
    assert p.peak_moment == "backward" and "saved activations" in p.gpu_terms
    step_only = states.lora_state_bytes(Q72.lora_params(16), "zero3", 8, grad_accum_bytes=2).gpu
    assert p.peak_allocated >= p.gpu_terms["base shard"] + step_only


def test_requests_that_cannot_run_are_refused_in_one_line():
    for bad, match in ((dict(precision="bf16"), "no bf16"), (dict(quant="int8"), "8-bit"),
                       (dict(backend="ddp", offload_param=True), "offload"), (dict(seq_len=0), "seq_len"),
                       (dict(backend="single"), "single")):
        with pytest.raises(UserError, match=match):
            req(**bad)


# --- what the backends borrow ---------------------------------------------------------------------

def test_zero3_release_rule_on_a_hand_made_trace():
    """a(10) b(5) a(10) c(1): with reuse distance 6, a is kept from its first use to its second (5 elements
    between), so a and b are live together; with distance 4, a is released and the peak is one module."""
    trace = [("a", 10), ("b", 5), ("a", 10), ("c", 1)]
    keep = buffers.ZeroSettings(max_reuse_distance=6, prefetch_bucket_size=0)
    drop = buffers.ZeroSettings(max_reuse_distance=4, prefetch_bucket_size=0)
    assert buffers.zero3_peak_gathered_elements(trace, keep) == 15
    assert buffers.zero3_peak_gathered_elements(trace, drop) == 10
    # With a prefetch bucket the gathered set grows to max_live_parameters, the module fetched on top of it,
    # never past every module of the trace (16 elements here).
    assert buffers.zero3_peak_gathered_elements(trace, replace(drop, prefetch_bucket_size=3, max_live_parameters=2)) == 12
    assert buffers.zero3_peak_gathered_elements(trace, replace(drop, prefetch_bucket_size=3, max_live_parameters=9)) == 16


def test_zero3_gathered_for_72b_and_a_small_model():
    """72B with the repository's JSON (max live 1e9): 1e9 elements prefetched plus the untied head (V*h =
    1.25e9) fetched on top. Without prefetch and reuse only the head is ever whole."""
    got = buffers.zero3_gathered_bytes(Q72, buffers.ZeroSettings(), compute_bytes=2, quant="none", checkpointing=True)
    assert got["gathered"] == 2 * (10**9 + Q72.vocab_size * Q72.hidden_size)
    assert got["reduce_bucket"] == 4 * Q72.hidden_size ** 2  # accelerate's auto reduce_bucket_size, fp32 LoRA grads
    bare = buffers.ZeroSettings(max_reuse_distance=0, prefetch_bucket_size=0)
    assert buffers.zero3_gathered_bytes(Q72, bare, compute_bytes=2, quant="none", checkpointing=True)["gathered"] == \
        2 * Q72.vocab_size * Q72.hidden_size
    # A small model is gathered whole: ZeRO-3 saves little there.
    small = buffers.zero3_gathered_bytes(Q05, buffers.ZeroSettings(), compute_bytes=2, quant="none", checkpointing=True)
    assert small["gathered"] > 0.95 * states.base_param_bytes(Q05, 2, "none")


def test_zero_settings_read_from_a_deepspeed_json():
    ds = json.loads((REPO / "accelerate_configs" / "deepspeed_zero3.json").read_text())
    z = buffers.ZeroSettings.from_ds_config(ds)
    assert z.prefetch_bucket_size is None and z.max_live_parameters == int(ds["zero_optimization"]["stage3_max_live_parameters"])
    assert z.resolved(8192).prefetch_bucket_size == int(0.9 * 8192 * 8192)
    assert z.resolved(8192).param_persistence_threshold == 81920


def test_fsdp_keeps_the_root_and_two_layers_or_everything():
    f = buffers.fsdp_gathered_bytes(Q72, compute_bytes=2, quant="none")
    assert f["root"] == 2 * (2 * Q72.vocab_size * Q72.hidden_size + Q72.hidden_size)
    lora_layer = 4 * Q72.lora_params(16) // Q72.num_layers
    assert f["layers"] == 2 * (2 * Q72.layer_params + lora_layer)
    whole = buffers.fsdp_gathered_bytes(Q72, compute_bytes=2, quant="none", reshard_after_forward=False)
    assert whole["layers"] == Q72.num_layers * (2 * Q72.layer_params + lora_layer)


# --- time ------------------------------------------------------------------------------------------

def test_time_model():
    p = estimate(req(dataset_tokens=10_000_000))
    t = p.time
    assert t.tokens_per_step == 2048 * 8 and t.step_s == pytest.approx(max(t.compute_s, t.allgather_s) + t.host_transfer_s)
    assert t.epoch_hours == pytest.approx(10_000_000 / t.tokens_per_s / 3600)
    no_ckpt = estimate(req(checkpointing=False, dataset_tokens=10_000_000)).time
    assert no_ckpt.model_flops == t.model_flops and t.hardware_flops > no_ckpt.hardware_flops
    measured = estimate(req(mfu=0.2)).time
    assert measured.mfu == pytest.approx(0.2) and measured.compute_s == pytest.approx(t.model_flops / (125e12 * 0.2))
    assert estimate(req(quant="nf4")).time.compute_s > t.compute_s  # dequantization


# --- advice and search -----------------------------------------------------------------------------

def test_suggestions_fit_and_come_cheapest_first():
    plan = estimate(req(backend="fsdp2", seq_len=4096))
    assert not plan.fits
    fixes = advice.suggestions(plan)
    assert fixes and all(s.plan.fits for s in fixes)
    keys = [(s.changes_the_job, s.slowdown) for s in fixes]
    assert keys == sorted(keys)
    assert advice.suggestions(estimate(req())) == []
    # ZeRO-3 at 4096 tokens: gathering less ahead (a lower max_live_parameters) is the cheapest way in.
    zero3 = advice.suggestions(estimate(req(seq_len=4096)))
    assert zero3[0].changes["zero"].max_live_parameters == 10**8 and zero3[0].plan.fits and not zero3[0].changes_the_job


def test_a_combination_is_found_when_no_single_change_fits():
    plan = estimate(req(backend="ddp", checkpointing=False, seq_len=4096))
    fixes = advice.suggestions(plan)
    assert len(fixes) == 1 and fixes[0].plan.fits and " + " in fixes[0].what


def test_search_finds_the_edge():
    r = req(model=Q7, gpu=A100, backend="single", gpus_per_node=1, precision="bf16", seq_len=4096)
    mb = advice.largest_fitting(r, "micro_batch")
    assert estimate(replace(r, micro_batch=mb)).fits and not estimate(replace(r, micro_batch=mb + 1)).fits
    seq = advice.largest_fitting(r, "seq_len")
    assert seq % 256 == 0 and estimate(replace(r, seq_len=seq)).fits and not estimate(replace(r, seq_len=seq + 256)).fits
    assert advice.largest_fitting(req(backend="ddp", checkpointing=False), "micro_batch") is None


# --- the README and the command line ---------------------------------------------------------------

def test_readme_table_is_the_planners_output():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import plan_table
    finally:
        sys.path.pop(0)
    assert plan_table.table() in (REPO / "README.md").read_text(encoding="utf-8")


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenloop", "plan", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_cli_json_and_exit_codes():
    fits = _plan("--model", "qwen2.5-72b", "--gpu", "v100-32gb", "--gpus", "8", "--precision", "fp16", "--json")
    assert fits.returncode == 0, fits.stderr
    out = json.loads(fits.stdout)
    assert out["fits"] is True and out["backend"] == "zero3" and out["world_size"] == 8
    assert out["required"] == out["peak_allocated"] + sum(out["overhead"].values())
    over = _plan("--model", "qwen2.5-72b", "--gpu", "v100-32gb", "--gpus", "8", "--backend", "fsdp2", "--seq-len", "4096",
                 "--search")
    assert over.returncode == 1 and "does not fit" in over.stdout and "cheapest first" in over.stdout
    assert "largest seq at micro-batch 1:" in over.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "qwen2.5-72b", "--gpu", "a100"], "did you mean a100-40gb or a100-80gb"),
    (["--model", "qwen9-7b", "--gpu", "v100-32gb"], "unknown model"),
    (["--model", "qwen2.5-7b", "--gpu", "v100-32gb", "--precision", "bf16"], "no bf16"),
    (["--model", "qwen2.5-7b", "--gpu", "v100-32gb", "--seq-len", "x"], "--seq-len"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message):
    proc = _plan(*args)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len([l for l in proc.stderr.splitlines() if l.startswith("error")]) == 1


def test_cli_reads_the_exact_run_from_its_files():
    """The 8x V100 recipe as the user launches it: 72B, ZeRO-3 + offload, fp16 from the DeepSpeed JSON."""
    proc = _plan("--config", "examples/configs/qwen2.5-72b-8xv100.yaml", "--accelerate-config",
                 "accelerate_configs/deepspeed_zero3_offload.yaml", "--gpu", "v100-32gb", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["backend"], out["world_size"], out["precision"]) == ("zero3", 8, "fp16")
    assert out["offload_param"] and out["offload_optimizer"] and out["seq_len"] == 2048 and out["grad_accum"] == 16
    assert out["model"] == "Qwen/Qwen2.5-72B"


def test_planning_modules_import_no_torch_and_no_training_code():
    """The arithmetic (estimate, buffers, timing, advice) stays pure: only ``run`` / ``cli`` touch the rest."""
    import ast

    import qwenloop.plan

    root = Path(qwenloop.plan.__file__).parent
    for module in ("estimate", "buffers", "timing", "advice"):
        tree = ast.parse((root / f"{module}.py").read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        tops = {m.split(".")[0] for m in names}
        assert not {"torch", "transformers", "deepspeed", "bitsandbytes", "accelerate"} & tops, (module, tops)
        assert not {"train", "model", "distributed", "data", "loss", "checks", "launch"} & {m.strip(".").split(".")[-1] for m in names}


ZERO3_CASES = [  # (checkpointing, DeepSpeed settings): reuse rule alone, prefetch up to max live, the repo's JSON
    (True, {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 100}),
    (True, {"stage3_max_reuse_distance": 10**9, "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 100}),
    (True, {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 3686, "stage3_param_persistence_threshold": 640,
            "stage3_max_live_parameters": 20000}),
    (False, {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 3686, "stage3_param_persistence_threshold": 640,
             "stage3_max_live_parameters": 60000}),
    (True, {"stage3_prefetch_bucket_size": 3686, "stage3_param_persistence_threshold": 640}),  # auto values, 1e9 defaults
]


def test_zero3_gathered_elements_match_a_real_engine(tiny_model):
    """A real ZeRO-3 engine's gathered set, sampled after every fetch of two training steps, against the
    planner's replay of the module trace: equal without prefetch, at most 10% above with it (an upper bound)."""
    import os
    import socket

    pytest.importorskip("deepspeed")
    from qwenloop.plan.shapes import spec_from_config

    cases = [{"ckpt": ckpt, "zero": zero} for ckpt, zero in ZERO3_CASES]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "zero3_gather_probe.py"), tiny_model, json.dumps(cases)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    spec = spec_from_config(tiny_model)
    for got in json.loads(lines[-1][len("RESULT"):]):
        zero = buffers.ZeroSettings.from_ds_config({"zero_optimization": got["zero"]})
        trace = buffers.module_trace(spec, got["ckpt"], "none", 2, lora_rank=4,
                                     persistence_threshold=zero.param_persistence_threshold)
        predicted = buffers.zero3_peak_gathered_elements(trace, zero)
        if not zero.prefetch_bucket_size:
            assert predicted == got["peak"], got
        else:
            assert got["peak"] <= predicted <= 1.10 * got["peak"], (predicted, got)
        threshold = zero.param_persistence_threshold
        lora_small = 0 if threshold <= 512 else 4 * spec.lora_params(4)  # every r4 matrix here is < 640 elements
        assert buffers.persistent_bytes(spec, 2, threshold, lora_rank=4) == 2 * (got["persistent"] - lora_small // 4) + lora_small


def test_cli_counts_the_datasets_tokens_for_the_epoch_time(tmp_path, tiny_model, train_jsonl):
    """--config naming a local model: train_file tokenized as training would, its tokens and target share used."""
    from qwenloop import TrainConfig
    from qwenloop.data import build_dataset
    from qwenloop.model import load_tokenizer

    from conftest import write_yaml

    config = write_yaml(tmp_path / "c.yaml", {"model": tiny_model, "train_file": train_jsonl, "max_seq_len": 256})
    proc = _plan("--config", str(config), "--gpu", "a100-80gb", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    cfg = TrainConfig.from_yaml(config)
    data = build_dataset(cfg.train_file, load_tokenizer(cfg), cfg)
    assert out["dataset_tokens"] == sum(data.lengths) > 0
    assert out["target_fraction"] == pytest.approx(data.target_tokens / sum(data.lengths))
    assert out["time"]["epoch_hours"] == pytest.approx(out["dataset_tokens"] / out["time"]["tokens_per_s"] / 3600)


def test_training_record_on_a_gpu_holds_the_whole_plan(monkeypatch, tiny_model, train_jsonl):
    """What train() writes to run.json on a GPU (checked here with the GPU named, not detected): the base
    bytes per rank and the run's whole plan; a plan the planner refuses is recorded, never raised."""
    from qwenloop import TrainConfig
    from qwenloop.launch import read_launch_config, single_process_launch
    from qwenloop.plan import run
    from qwenloop.plan.shapes import spec_from_config

    from transformers import AutoConfig

    monkeypatch.setattr(run, "gpu_from_device", lambda index=0: A100)
    config = AutoConfig.from_pretrained(tiny_model)  # the loaded model's config, as train() passes it
    cfg = TrainConfig.from_dict({"model": tiny_model, "train_file": train_jsonl, "max_seq_len": 256})
    launch = replace(single_process_launch(), mixed_precision="bf16")
    record = run.training_record(cfg, launch, config, 1, 2, on_gpu=True)
    assert record["base_param_bytes_per_rank"] == states.base_param_bytes(spec_from_config(tiny_model), 2, "none")
    assert record["gpu"] == A100.name and record["fits"] and record["peak_allocated"] == sum(record["gpu_terms"].values())
    stage2 = replace(read_launch_config(REPO / "accelerate_configs" / "deepspeed_zero3.yaml"), backend="deepspeed", zero_stage=2)
    assert "ZeRO stage 3 only" in run.training_record(cfg, stage2, config, 8, 2, on_gpu=True)["error"]
