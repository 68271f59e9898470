"""Model-state terms of the planner (``qwenloop.plan.states``) against DeepSpeed's estimator and real models.

No process is launched: per-rank ZeRO-3 / FSDP figures are derived from the formulas and compared with the
whole model's measured bytes / 2 plus padding (what ``tests/test_distributed.py`` and ``tests/test_fsdp.py``
assert of real 2-rank runs).
"""

import pytest
import torch

from qwenloop.errors import UserError
from qwenloop.plan import states
from qwenloop.plan.shapes import PRESETS, spec_from_config

BNB_4BIT = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


# ---------------------------------------------------------------- DeepSpeed's estimator (full training)

@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "qwen2.5-7b", "qwen3-8b"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (4, 2)])
@pytest.mark.parametrize("offload,offload_params", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("zero_init", [True, False])
def test_full_training_matches_deepspeed_estimator(preset, gpus, nodes, offload, offload_params, zero_init):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    spec = PRESETS[preset]
    largest = states.largest_layer_params(spec)
    args = (spec.num_params, largest, gpus, nodes, offload, offload_params, zero_init, 1.5)
    assert states.zero3_full_training_bytes(*args) == estimate_zero3_model_states_mem_needs(*args)


def test_zero3_terms_and_offload_placement():
    """Which ZeRO-3 buffer sits where, and the estimator's per-node host RAM = per-rank figure * ranks."""
    W, P = 8, 8 * 1000
    part = P // W
    t = states.zero3_trainable_terms(P, W, weight_bytes=2, grad_accum_bytes=2)
    assert t == {"lp_param": 2 * part, "fp32_master": 4 * part, "grad_partitions": 2 * part,
                 "exp_avg+exp_avg_sq": 8 * part, "fp32_grad (step)": 4 * part}
    on = states.lora_state_bytes(P, "zero3", W)  # fp32 LoRA, bf16 gradients, at the optimizer step
    assert (on.gpu, on.host) == (22 * part, 0)
    assert states.lora_state_bytes(P, "zero3", W, at_step=False).gpu == 18 * part
    off = states.lora_state_bytes(P, "zero3", W, offload_optimizer=True, at_step=False)
    assert (off.gpu, off.host) == (4 * part, 18 * part)  # the host keeps the fp32 gradient buffer
    both = states.lora_state_bytes(P, "zero3", W, offload_optimizer=True, offload_param=True)
    assert (both.gpu, both.host) == (0, 22 * part)
    assert states.zero3_init_transient_bytes(P) == 4 * P
    assert states.zero3_init_transient_bytes(P, sub_group_size=100) == 400
    cpu, _, _ = states.zero3_full_training_bytes(P, 0, W, 1, True, True, True, 1.0)
    assert cpu == 18 * part * W  # the estimator: 18 B per partitioned parameter, per node


def test_lora_state_is_far_below_full_training():
    spec = PRESETS["qwen2.5-7b"]
    P = spec.lora_params(16)
    part = -(-P // 8)
    lora = states.lora_state_bytes(P, "zero3", 8)
    assert lora.gpu == 22 * part
    full_gpu = states.zero3_full_training_bytes(spec.num_params, 0, 8, 1, False, False)[1]
    lora_total = lora.gpu + states.base_bytes_per_rank(spec, "zero3", 8, 2)
    assert lora_total < full_gpu / 6  # 2 B/param of frozen base vs the estimator's 18
    assert states.lora_state_bytes(P, "ddp", 8).gpu == 20 * P  # + DDP's gradient buckets
    assert states.lora_state_bytes(P, "single", 1).gpu == states.lora_state_bytes(P, "ddp", 1).gpu == 16 * P
    assert states.lora_state_bytes(P, "fsdp2", 8).gpu == 16 * part
    with pytest.raises(UserError):
        states.lora_state_bytes(P, "ddp", 2, offload_optimizer=True)
    with pytest.raises(UserError):
        states.base_bytes_per_rank(spec, "tp", 2)


def test_model_state_bytes_offload_moves_terms_to_host():
    spec = PRESETS["qwen2.5-1.5b"]
    on = states.model_state_bytes(spec, "zero3", 4)
    off = states.model_state_bytes(spec, "zero3", 4, offload_optimizer=True, offload_param=True)
    assert off["gpu"] == 0 and off["host_per_rank"] == on["gpu"]
    assert off["host_per_node"] == 4 * off["host_per_rank"]
    q = states.model_state_bytes(spec, "zero3", 4, quant="nf4", offload_optimizer=True, offload_param=True)
    quant_state = states.base_bytes(spec, 2, "nf4") - states.base_param_bytes(spec, 2, "nf4")
    assert q["gpu"] == q["base"] == quant_state  # not a parameter: offload_param leaves it on the GPU


# ---------------------------------------------------------------- a real model's bytes

@pytest.fixture(scope="module")
def fp32_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def nf4_model(tiny_model):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        return AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=BitsAndBytesConfig(**BNB_4BIT),
                                                    dtype=torch.bfloat16)
    except Exception as e:  # pragma: no cover - a bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes cannot load 4-bit on this machine: {e}")


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _quant_state_bytes(model):
    """Quant-state bytes of every Linear4bit weight, counted both ways: ``serialized`` (``as_dict``, what a
    checkpoint stores: every weight its own code tables) and ``resident`` (unique storages in memory)."""
    serialized, seen, resident = 0, set(), 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            continue
        d = qs.as_dict(packed=True)
        serialized += sum(v.numel() * v.element_size() for k, v in d.items()
                          if torch.is_tensor(v) and "quant_state." not in k)
        tensors = [qs.absmax, qs.code, qs.offset] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
        for t in tensors:
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                resident += t.numel() * t.element_size()
    return serialized, resident


def test_fp32_base_bytes_match_the_real_model(tiny_model, fp32_model):
    spec = spec_from_config(tiny_model)
    whole = _param_bytes(fp32_model)
    assert states.base_param_bytes(spec, 4) == whole == 4 * spec.num_params
    assert states.base_bytes_per_rank(spec, "ddp", 2, 4) == whole
    # Each predicted tensor is one real parameter, with its numel and rows (FSDP2 shards dim 0).
    real = sorted((p.numel(), p.shape[0]) for p in fp32_model.parameters())
    assert sorted((t.numel, t.dim0) for t in states.base_tensors(spec, 4)) == real


def test_nf4_base_bytes_match_the_real_model(tiny_model, nf4_model):
    spec = spec_from_config(tiny_model)
    params = states.base_param_bytes(spec, 2, "nf4")
    assert params == _param_bytes(nf4_model)  # packed 4-bit weights + bf16 embeddings, norms, biases, head
    real = sorted((p.numel(), p.shape[0], p.element_size()) for p in nf4_model.parameters())
    assert sorted((t.numel, t.dim0, t.itemsize) for t in states.base_tensors(spec, 2, "nf4") if t.shardable) == real
    # Quant state: not parameters. Resident (unique storages, what the planner needs): every weight keeps its
    # own absmax, offset, nested absmax and both code tables; a checkpoint (as_dict) stores offset as a float.
    serialized, resident = _quant_state_bytes(nf4_model)
    predicted = states.base_bytes(spec, 2, "nf4") - params
    assert predicted == resident, (predicted, resident, serialized)
    weights = [i * o for i, o in spec.linear_shapes().values()] * spec.num_layers
    assert serialized == resident - 4 * len(weights)


def test_per_rank_base_bytes_on_two_ranks(tiny_model, fp32_model, nf4_model):
    """What the 2-rank tests assert of real runs: ZeRO-3 and FSDP ranks hold about half the base."""
    spec = spec_from_config(tiny_model)
    for model, c, quant in ((fp32_model, 4, "none"), (nf4_model, 2, "nf4")):
        whole = _param_bytes(model)
        zero3 = states.base_bytes_per_rank(spec, "zero3", 2, c, quant, include_quant_state=False)
        pad = sum((p.numel() % 2) * p.element_size() for p in model.parameters())  # one element per odd tensor
        assert 2 * zero3 == whole + pad
        assert abs(zero3 - whole / 2) <= 0.02 * whole  # test_distributed.py's tolerance
        fsdp2 = states.base_bytes_per_rank(spec, "fsdp2", 2, c, quant, include_quant_state=False)
        real = sum(-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) * p.element_size() for p in model.parameters())
        local = sum(torch.chunk(p.detach(), 2, dim=0)[0].numel() * p.element_size() for p in model.parameters())
        assert fsdp2 == real == local  # rank 0's chunk is the padded size
        assert abs(2 * fsdp2 - whole) <= 0.01 * whole  # test_fsdp.py's tolerance
        fsdp1 = states.base_bytes_per_rank(spec, "fsdp1", 2, c, quant, include_quant_state=False)
        assert fsdp1 in (whole // 2, (whole + c) // 2)
    # The quant state is never sharded: every rank keeps all of it.
    q = states.base_bytes(spec, 2, "nf4") - states.base_param_bytes(spec, 2, "nf4")
    assert states.base_bytes_per_rank(spec, "zero3", 2, 2, "nf4") == q + states.base_bytes_per_rank(
        spec, "zero3", 2, 2, "nf4", include_quant_state=False)


def test_nf4_bytes_per_param_of_a_real_size():
    """~0.516 B per quantized weight with double quant, 0.5625 without: the figures bitsandbytes documents."""
    n = 3584 * 18944
    assert (states.nf4_quant_state_bytes(n) - 1092) / n + 0.5 == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
    assert states.nf4_quant_state_bytes(n, double_quant=False) / n == pytest.approx(4 / 64, rel=1e-3)
    spec = PRESETS["qwen2.5-7b"]
    ratio = states.base_bytes(spec, 2, "nf4") / states.base_bytes(spec, 2)
    assert 0.3 < ratio < 0.4  # embeddings and head stay bf16


def test_int8_base_bytes_match_the_real_model(tiny_model):
    """``load_in_8bit`` (``qwenloop.model``'s 8-bit config): int8 weights, plus an fp32 ``SCB`` per output row."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.bfloat16)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"bitsandbytes cannot load 8-bit on this machine: {e}")
    spec = spec_from_config(tiny_model)
    assert states.base_param_bytes(spec, 2, "int8") == _param_bytes(model)
    real = sorted((p.numel(), p.shape[0], p.element_size()) for p in model.parameters())
    assert sorted((t.numel, t.dim0, t.itemsize) for t in states.base_tensors(spec, 2, "int8") if t.shardable) == real
    seen, scb = set(), 0
    for p in model.parameters():
        s = getattr(p, "SCB", None)
        if s is not None and s.untyped_storage().data_ptr() not in seen:
            seen.add(s.untyped_storage().data_ptr())
            scb += s.numel() * s.element_size()
    assert states.base_bytes(spec, 2, "int8") - states.base_param_bytes(spec, 2, "int8") == scb


def test_states_imports_no_training_code_and_no_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(states))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {"torch", "transformers", "deepspeed", "bitsandbytes"} & {m.split(".")[0] for m in names}
    assert not {"train", "model", "distributed", "data", "loss"} & {m.strip(".").split(".")[-1] for m in names}


_ZERO3_PROBE = r"""
import json, os, sys, torch
import deepspeed
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
deepspeed.init_distributed(dist_backend="gloo")
keep = HfDeepSpeedConfig(cfg)  # from_pretrained loads under zero.Init, as accelerate makes it for qwenloop
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()  # qwenloop.model: trainable weights in fp32
trainable = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
o = engine.optimizer
after_init = [t.grad for t in o.fp32_partitioned_groups_flat]  # the init-time gradient_buffer is gone
step_grads = []
prepare = o._prepare_fp32_grad_for_sub_group
def spy(i):
    prepare(i)
    step_grads.append(o.fp32_partitioned_groups_flat[i].grad)
o._prepare_fp32_grad_for_sub_group = spy
x = torch.randint(0, 500, (1, 8))
engine.backward(engine(input_ids=x, labels=x).loss)
engine.step()
nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
out = {
    "P": sum(p.numel() for p in trainable),
    "lp_param": nbytes(o.fp16_partitioned_groups_flat),
    "fp32_master": nbytes(o.fp32_partitioned_groups_flat),
    "grad_partitions": nbytes([o.grad_partitions_flat_buffer]),
    "fp32_grad (step)": nbytes(step_grads),
    "exp_avg+exp_avg_sq": nbytes([v for s in o.optimizer.state.values() for k, v in s.items()
                                  if k.startswith("exp_avg")]),
}
assert all(g is None for g in after_init), after_init
assert all(t.grad is None for t in o.fp32_partitioned_groups_flat)  # freed after the step
print("RESULT" + json.dumps(out))
"""


def test_zero3_trainable_buffers_of_a_real_engine(tiny_model, tmp_path):
    """One ZeRO-3 rank (gloo, CPU, bf16) with fp32 LoRA: every buffer ``zero3_trainable_terms`` names, measured."""
    import json
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    script = tmp_path / "probe.py"
    script.write_text(_ZERO3_PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, str(script), tiny_model], env=env, capture_output=True, text=True,
                          timeout=180)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    measured = json.loads(lines[-1][len("RESULT"):])
    P = measured.pop("P")
    assert P == spec_from_config(tiny_model).lora_params(4, ["q_proj", "v_proj"])
    assert measured == states.zero3_trainable_terms(P, 1, weight_bytes=4, grad_accum_bytes=2)
    assert sum(measured.values()) == states.lora_state_bytes(P, "zero3", 1).gpu == 22 * P
