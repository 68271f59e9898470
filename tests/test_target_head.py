"""The target-only LM head trains exactly like the full-logits loss: same per-step losses, eval loss and
adapter, with untied and tied embeddings and on a 4-bit base; its run reports the throughput metrics.

Under DDP, ZeRO-3 (LM head partitioned and gathered by DeepSpeed's hooks), FSDP2 and FSDP1 the head is on
by default, and those runs are compared with this single-process run in test_distributed.py /
test_fsdp.py: together, every backend's head-path loss equals the full-logits loss."""

import json

import pytest
import torch

from conftest import assert_adapters_close, base_config, read_metrics, train_in_process
from qwenloop.loss import TargetLossHead


def run(tmp_path, name, model, data, **overrides):
    return train_in_process(base_config(model, data, tmp_path / name, **overrides))


def both(tmp_path, model, data, **overrides):
    on = run(tmp_path, "head", model, data, lm_head_targets_only=True, **overrides)
    off = run(tmp_path, "logits", model, data, lm_head_targets_only=False, **overrides)
    return on, off


@pytest.fixture(scope="session")
def tied_model(tiny_model, tmp_path_factory):
    """The tiny model with tied input/output embeddings (as Qwen2.5-0.5B..3B and Qwen3 small models)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tied-qwen2")
    untied = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model, tie_word_embeddings=True))
    model.load_state_dict({k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}, strict=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


def test_head_equals_full_logits_and_reports_metrics(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    on, off = both(tmp_path, tiny_model, train_jsonl, max_steps=4, gradient_accumulation_steps=2, eval_file=train_jsonl,
                   eval_every_steps=2)
    assert isinstance(on.model.get_base_model().lm_head, TargetLossHead)
    assert type(off.model.get_base_model().lm_head) is torch.nn.Linear
    assert on.losses == pytest.approx(off.losses, rel=1e-5)
    assert on.eval_loss == pytest.approx(off.eval_loss, rel=1e-5)
    assert_adapters_close(on.adapter_dir, off.adapter_dir, rel=1e-5)

    steps = [m for m in read_metrics(on.output_dir) if "loss" in m]
    for m in steps:
        assert 0 < m["target_tokens_per_s"] < m["tokens_per_s"]
        assert 0 <= m["padding_fraction"] < 1
        assert m["step_s"] == pytest.approx(m["data_s"] + m["fwd_bwd_s"] + m["optimizer_s"], abs=2e-4)
        assert m["mem_peak_gib"] > 0
    assert steps[-1]["target_tokens"] > steps[0]["target_tokens"] > 0
    summary = json.loads((tmp_path / "head" / "run.json").read_text())
    assert summary["target_tokens_seen"] == steps[-1]["target_tokens"] and summary["tokens_seen"] == steps[-1]["tokens"]
    assert summary["train_seconds"] > 0 and summary["peak_memory_per_rank"][0]["rss_gib"] > 0
    assert "mfu" not in steps[0] and summary["peak_tflops"] is None  # a CPU has no table entry


def test_mfu_reported_when_the_peak_is_known(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    result = run(tmp_path, "mfu", tiny_model, train_jsonl, max_steps=2, peak_tflops=0.001)
    steps = [m for m in read_metrics(result.output_dir) if "loss" in m]
    assert all(m["mfu"] > 0 for m in steps)
    summary = json.loads((tmp_path / "mfu" / "run.json").read_text())
    assert summary["mfu"] == pytest.approx(summary["model_flops"] / (summary["train_seconds"] * 1e9), rel=1e-3)


def test_flops_model_on_public_shapes():
    """Qwen2.5-7B (config.json: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab
    152064) has 7.62B parameters: the matmul weights plus embedding and head must add up to that."""
    from types import SimpleNamespace

    from qwenloop.flops import decoder_shape, peak_tflops, step_flops

    cfg = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064)
    shape = decoder_shape(cfg, lora_rank=16, lora_targets=["q_proj", "v_proj"])
    assert (shape.matmul_params + 2 * 152064 * 3584) / 1e9 == pytest.approx(7.62, abs=0.01)
    assert shape.lora_per_token == 28 * 16 * ((3584 + 3584) + (3584 + 512))
    model, hardware = step_flops(shape, tokens=1000, target_tokens=300, attention_pairs=500_500, checkpointing=True)
    p = shape.matmul_params
    attention = 4 * 28 * 128 * 28 * 500_500
    assert model == pytest.approx(4 * p * 1000 + 3 * attention + 6 * shape.lora_per_token * 1000 + 4 * 3584 * 152064 * 300)
    assert hardware - model == pytest.approx(2 * p * 1000 + attention + 2 * shape.lora_per_token * 1000)
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0 and peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0 and peak_tflops(None, "bf16") is None


def test_head_with_tied_embeddings(tmp_path, tied_model, train_jsonl, reset_accelerate):
    on, off = both(tmp_path, tied_model, train_jsonl, max_steps=3, learning_rate=5e-3)
    base = on.model.get_base_model()
    assert isinstance(base.lm_head, TargetLossHead) and base.lm_head.weight is base.model.embed_tokens.weight
    assert on.losses == pytest.approx(off.losses, rel=1e-5)
    assert_adapters_close(on.adapter_dir, off.adapter_dir, rel=1e-5)


def test_head_on_a_4bit_base(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    pytest.importorskip("bitsandbytes")
    on, off = both(tmp_path, tiny_model, train_jsonl, max_steps=3, learning_rate=5e-3, quantization={"bits": 4})
    assert isinstance(on.model.get_base_model().lm_head, TargetLossHead)  # bitsandbytes keeps lm_head unquantized
    assert on.losses == pytest.approx(off.losses, rel=1e-5)
    assert_adapters_close(on.adapter_dir, off.adapter_dir, rel=1e-5)


def test_lora_on_lm_head_falls_back_to_full_logits(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    targets = ["q_proj", "v_proj", "lm_head"]
    on, off = both(tmp_path, tiny_model, train_jsonl, max_steps=2, lora={"target_modules": targets})
    assert not any(isinstance(m, TargetLossHead) for m in on.model.modules())
    assert on.losses == pytest.approx(off.losses, rel=1e-6)
