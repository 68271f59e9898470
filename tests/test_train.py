"""Single-process training, in this process: loss falls, the adapter reloads in PEFT exactly,
gradient accumulation is equivalent to a bigger batch, QLoRA trains."""

import warnings

import pytest
import torch

from conftest import assert_adapters_close, base_config, load_adapter_tensors, read_metrics, train_in_process
from qwenloop import TrainConfig
from qwenloop.adapter import verify_adapter
from qwenloop.model import expected_adapter_shapes


def run(tmp_path, name, tiny_model, data, **overrides):
    return train_in_process(base_config(tiny_model, data, tmp_path / name, **overrides))


def test_loss_falls_and_files_are_written(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    result = run(tmp_path, "run", tiny_model, train_jsonl, max_steps=30, learning_rate=3e-3, lr_scheduler="constant", lora={"r": 8},
                 eval_file=train_jsonl, eval_every_steps=10)
    losses = result.losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    metrics = read_metrics(result.output_dir)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 31))
    assert all({"step", "loss", "lr", "tokens"} <= set(m) for m in steps)
    assert steps[-1]["tokens"] > steps[0]["tokens"] > 0
    assert sum("eval_loss" in m for m in metrics) == 3  # steps 10, 20 and the final evaluation
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "adapter" / "tokenizer_config.json").exists()


def test_adapter_reloads_in_peft_with_identical_logits(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run(tmp_path, "run", tiny_model, train_jsonl, max_steps=5, learning_rate=1e-2)
    trained = result.model.eval()
    verify_adapter(result.adapter_dir, expected_adapter_shapes(trained))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.adapter_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, untrained = loaded(ids).logits, trained(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got - untrained).abs().max() > 1e-3  # the adapter does something: the check above can fail


def test_gradient_accumulation_equals_bigger_batch(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    """2 x micro-batch 2 == 1 x micro-batch 4, with uneven target-token counts per micro-batch."""
    common = dict(max_steps=4, learning_rate=5e-3)
    accumulated = run(tmp_path, "acc", tiny_model, train_jsonl, micro_batch_size=2, gradient_accumulation_steps=2, **common)
    big = run(tmp_path, "big", tiny_model, train_jsonl, micro_batch_size=4, gradient_accumulation_steps=1, **common)
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5)
    assert_adapters_close(accumulated.adapter_dir, big.adapter_dir, rel=1e-5)
    # The micro-batches really had different numbers of target tokens (else a mean of means would pass too).
    assert _uneven_targets(tiny_model, train_jsonl)


def _uneven_targets(tiny_model, data):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from qwenloop.data import build_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = build_dataset(data, tok, SimpleNamespace(format="auto", max_seq_len=128, truncation="truncate", train_on_prompt=False))
    counts = ds.dataset["num_targets"]
    return len(set(counts)) > 1


def test_qlora_4bit_trains(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    pytest.importorskip("bitsandbytes")
    result = run(tmp_path, "qlora", tiny_model, train_jsonl, max_steps=20, learning_rate=3e-3, lr_scheduler="constant",
                 quantization={"bits": 4})
    base = result.model.get_base_model()
    quantized = [m for m in base.modules() if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 14  # 7 projections x 2 layers hold 4-bit weights
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-5:]) < 0.9 * sum(result.losses[:5]), result.losses
    verify_adapter(result.adapter_dir, expected_adapter_shapes(result.model))


def test_checkpointing_modes_train_like_no_checkpointing(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    """Non-reentrant and reentrant checkpointing give the same training as none: LoRA gets its
    gradients in both (reentrant needs enable_input_require_grads, else nothing trains)."""
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, overrides in [("none", {"gradient_checkpointing": False}),
                                ("nonreentrant", {"gradient_checkpointing": True}),
                                ("reentrant", {"gradient_checkpointing": True, "gradient_checkpointing_reentrant": True})]:
            results[name] = run(tmp_path, name, tiny_model, train_jsonl, max_steps=3, learning_rate=5e-3, **overrides)
    # transformers' v6 removals (gradient_checkpointing_enable, is_gradient_checkpointing) are not used any more
    deprecated = [str(w.message) for w in caught if "gradient_checkpointing" in str(w.message) and "deprecated" in str(w.message)]
    assert not deprecated, deprecated
    for name in ("nonreentrant", "reentrant"):
        assert results[name].losses == pytest.approx(results["none"].losses, rel=1e-5), name
        tensors = load_adapter_tensors(results[name].adapter_dir)
        assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), f"{name}: some LoRA B never trained"


def test_lora_weights_stay_fp32_under_fp16(tiny_model):
    """Under fp16 AMP the frozen base is fp16 and every trainable (LoRA) weight fp32: GradScaler
    refuses to unscale fp16 gradients."""
    from types import SimpleNamespace

    from qwenloop.model import load_model

    fp16_backend = SimpleNamespace(mixed_precision="fp16", check_quantization=lambda bits: None,
                                   from_pretrained_kwargs=lambda quantized: {}, load_on_meta=lambda quantized: False)
    cfg = TrainConfig.from_dict({"model": tiny_model, "train_file": "unused.jsonl"})
    model = load_model(cfg, fp16_backend)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.float16}


def test_tensorboard_tracker(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    pytest.importorskip("tensorboard")
    result = run(tmp_path, "tb", tiny_model, train_jsonl, max_steps=2, report_to=["tensorboard"])
    events = list((tmp_path / "tb" / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0, result
