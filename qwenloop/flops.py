"""FLOPs of one LoRA training step on a frozen base, and accelerators' peak rates: the `mfu` metric.

Counted per step from what the collator reports (tokens, target tokens, causal attention pairs), with
the model's shapes (dense Qwen2 / Qwen2.5 / Qwen3 or Llama-style decoders). A multiply-add is 2 FLOPs.

* ``P`` = matmul weights of the decoder per token: per layer ``H*q + 2*H*kv + q*H + 3*H*I`` (q, k, v,
  o projections and the gated MLP), ``q = heads*head_dim``, ``kv = kv_heads*head_dim``.
* decoder forward: ``2*P`` per token. Backward: ``2*P`` per token, the gradient with respect to the
  activations only; the frozen base has **no weight gradients** (a full fine-tune would be ``4*P``).
* attention forward: ``4*q`` per causal (query, key) pair per layer (QK^T and AV); its backward twice
  that. Pairs are counted per example, ``l*(l+1)/2``: what a kernel that skips masked blocks does.
* LoRA on a ``(in, out)`` projection with rank ``r``: forward ``2*r*(in+out)`` per token, backward
  twice that (activation and LoRA-weight gradients).
* LM head: ``2*H*V`` forward and ``2*H*V`` backward (activation gradient only) per **target** token.
* gradient checkpointing recomputes the decoder forward (weights, attention, LoRA) once more.

``model_flops`` is the work the step needs (head at target positions, no recompute): its ratio to the
hardware's peak is the MFU (PaLM's definition, adapted to a frozen base). ``hardware_flops`` adds the
recompute (HFU). The peak is dense tensor-core throughput in the run's precision, from the table
below (vendor datasheets) or ``peak_tflops`` in the training config.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense (no sparsity) peak TFLOPS per GPU, by precision. Matched against torch.cuda.get_device_name()
# by substring, first match wins (so "H100 PCIe" before "H100").
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "no": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "no": 378.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "no": 494.0}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "no": 156.0}),  # fp32 via TF32
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "no": 183.0}),
    ("A6000", {"bf16": 155.0, "fp16": 155.0, "no": 77.0}),
    ("4090", {"bf16": 165.0, "fp16": 165.0, "no": 83.0}),  # fp32 accumulate
    ("A10", {"bf16": 125.0, "fp16": 125.0, "no": 62.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "no": 60.0}),
    ("V100", {"fp16": 125.0, "no": 15.7}),  # no bf16 tensor cores
    ("T4", {"fp16": 65.0, "no": 8.1}),
]


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Peak dense TFLOPS of one GPU named ``device_name`` in ``precision`` (fp16 / bf16 / no), or None."""
    if not device_name:
        return None
    for key, by_precision in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return by_precision.get(precision)
    return None


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_per_token: int = 0  # sum over adapted projections of r*(in+out)

    @property
    def matmul_params(self) -> int:
        """``P``: decoder weights one token is multiplied by (embedding and head excluded)."""
        q, kv, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        return self.layers * (h * q + 2 * h * kv + q * h + 3 * h * self.intermediate)


def decoder_shape(config, lora_rank: int = 0, lora_targets=()) -> DecoderShape:
    """The shapes that matter for FLOPs, from a transformers config (``text_config`` when nested)."""
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    h, i, q, kv = text.hidden_size, text.intermediate_size, text.num_attention_heads * head_dim, kv_heads * head_dim
    fan = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
           "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    lora = sum(lora_rank * sum(fan[t]) for t in lora_targets if t in fan) * text.num_hidden_layers
    return DecoderShape(h, i, text.num_hidden_layers, text.num_attention_heads, kv_heads, head_dim, text.vocab_size, lora)


def step_flops(shape: DecoderShape, tokens: int, target_tokens: int, attention_pairs: int, checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training step over ``tokens`` non-padding tokens."""
    p = shape.matmul_params
    attention_fwd = 4.0 * shape.heads * shape.head_dim * shape.layers * attention_pairs
    decoder_fwd = 2.0 * p * tokens + attention_fwd + 2.0 * shape.lora_per_token * tokens
    decoder_bwd = 2.0 * p * tokens + 2 * attention_fwd + 4.0 * shape.lora_per_token * tokens
    head = 4.0 * shape.hidden * shape.vocab * target_tokens
    model = decoder_fwd + decoder_bwd + head
    return model, model + (decoder_fwd if checkpointing else 0.0)
