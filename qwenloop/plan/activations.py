"""Activation memory of one micro-batch: what autograd keeps between forward and backward, in bytes.

Pure arithmetic on shapes (no torch, no model), for dense Qwen2 / Qwen2.5 / Qwen3-style decoders trained
the way qwenloop trains them: frozen base (compute dtype ``c`` bytes: 2 for bf16/fp16 under autocast, 4 for
fp32), LoRA weights in fp32 (``a = 4`` bytes) on q, k, v, o, gate, up, down, ``use_cache=False``, optional
non-reentrant gradient checkpointing of every decoder layer, and the loss through ``loss.TargetLossHead``
(the LM head and cross-entropy on target positions only) or, for comparison, the full-logits fallback.

Every term was derived by *counting* what a real forward saves (``torch.autograd.graph.saved_tensors_hooks``
on a random-init model with real Qwen2.5 shapes, see ``tests/test_plan_activations.py``), then written as a
formula. What is counted is **unique storages that are not parameters**: a saved weight is a parameter and
costs nothing extra, and several saved tensors that are views of one storage (``q.transpose``, the reshape
into ``o_proj``) or one tensor saved by several ops (the norm output saved by three LoRA ``lora_A``) occupy
that storage once. That is the memory the forward leaves behind for the backward.

Notation: ``T = batch * seq`` positions; ``h`` hidden, ``i`` intermediate, ``q = heads * head_dim``,
``kv = kv_heads * head_dim``, ``r`` LoRA rank, ``V`` vocab; ``c`` compute-dtype bytes, ``a`` LoRA-dtype bytes
(4), *autocast* means ``c != a``. Tying (or not) the embedding and the LM head, and the q/k/v biases,
change no saved tensor: the frozen head and biases save nothing of their own.

Per decoder layer, no checkpointing (the layer's input requires grad; see ``first_layer_frozen_input``):

* 2 RMSNorms: ``2 * T * (h + 1) * 4``. Qwen's RMSNorm computes in fp32: ``pow`` and ``x * rsqrt`` save the
  fp32 input (the input itself in fp32; a fresh fp32 copy of the bf16 input under autocast), ``rsqrt``
  saves its ``[b, s, 1]`` fp32 result; the final ``weight * x`` saves only the (frozen) weight.
* frozen base projections save **no activation**: autograd saves ``linear``'s input only for the weight
  gradient, which a frozen weight does not need. Their inputs are kept by LoRA (below) or not at all.
* LoRA on a projection with ``n`` input features, ``m`` output features:

  - fp32 without dropout: ``lora_A`` saves the projection's input *itself*, shared by every adapted
    projection reading it: the input norm output ``T*h*c`` (q, k, v), the attention output (o: already
    saved by sdpa), the post-attention norm output ``T*h*c`` (gate, up), the MLP product ``T*i*c`` (down),
    each counted once if any projection reading it is adapted;
  - with dropout > 0: ``lora_A`` saves the dropped copy ``T*n*a`` and dropout saves its mask: ``T*n*1``
    (CUDA's fused ``native_dropout``, a bool mask) or ``T*n*a`` (CPU: ``x * noise``, the scaled noise in
    x's dtype, measured);
  - under autocast: PEFT casts x to the LoRA dtype (fp32) and autocast casts it back to bf16 for
    ``lora_A``'s GEMM: a fresh ``T*n*c`` copy per adapted projection (q, k and v each keep their own;
    the bf16 norm output itself is kept by nobody), plus the dropout mask as above; and autocast's cached
    bf16 copies of the LoRA weights, ``r*m*c`` for ``lora_B`` and ``r*n*c`` for ``lora_A`` (the latter
    only when x needs a gradient);
  - ``lora_B`` saves its input, ``T*r`` in ``c`` under autocast, else ``a``.
* rotary: ``q*cos`` and ``rotate_half(q)*sin`` save ``cos`` and ``sin`` ([1, s, head_dim] each, one pair for
  the whole model): ``2*s*head_dim*c``, counted once per model.
* attention, ``attn="sdpa"``: query ``T*q*c``, key and value ``T*kv*c`` each (GQA heads are not repeated:
  without a mask transformers passes ``enable_gqa``), the output ``T*q*c`` (also o_proj's input: the
  kernel writes it in the query's [b, s, heads, d] memory layout, so transpose + reshape are views) and the
  fp32 log-sum-exp ``b*heads*s*4``. With a padding mask (``attention_mask=True``) transformers repeats key
  and value to all heads (``T*q*c`` each) and the kernel saves the bool mask converted to a float bias,
  ``b*s*s*c``. Measured on the CPU, where torch runs ``_scaled_dot_product_flash_attention_for_cpu`` (fp32
  and bf16, with or without a mask) and saves exactly that set, no ``[s, s]`` matrix; CUDA's flash and
  memory-efficient kernels save the same set by their backward signatures (plus two scalar RNG tensors;
  the efficient kernel pads the log-sum-exp to 32 positions), not measured here.
* attention, ``attn="eager"``: query and the head-repeated key and value ``3*T*q*c`` (copies made by
  ``matmul``'s reshape and ``repeat_kv``), the fp32 softmax ``b*heads*s*s*4`` and, under autocast, its
  bf16 copy ``b*heads*s*s*c`` that multiplies V; the output (o_proj's input) is a fresh contiguous copy,
  kept only by o's LoRA (counted as above).
* Qwen3's q_norm / k_norm (per-head RMSNorm): ``T*(q + heads)*4 + T*(kv + kv_heads)*4``, as above.
* MLP: ``silu`` saves its input (gate output), ``act * up`` saves both factors: ``3*T*i*c``; the product
  (down's input) goes by the LoRA rule.

The first layer's input is the frozen embedding's output, which does not require grad: its input norm
saves nothing (``- T*(h+1)*4``) and neither do the q/k/v LoRA dropouts (no gradient flows into their
input: ``- T*h*mask`` each), unless ``enable_input_require_grads()`` made the embedding output require grad
(transformers' ``activation_checkpointing_enable`` does so itself): ``first_layer_frozen_input=False``.

Whole model, no checkpointing: ``sum(layers) + rope + final norm T*(h+1)*4 + loss``.

With non-reentrant checkpointing (what ``model.activation_checkpointing_enable`` installs) nothing inside a
layer is saved; the checkpoint saves the layer's input ``T*h*c`` (all layers, the first included) and keeps
the layer's keyword arguments referenced until its backward (not saved tensors, but alive all the same):
the rotary ``cos``/``sin`` and the 4D attention mask when there is one (bool ``b*s*s`` for sdpa with
padding; eager always builds one, ``b*s*s*c``): ``L*T*h*c + rope + mask + final norm + loss``. During the
backward of one layer its forward is rerun and its full saved set comes back: ``recompute_working_set_bytes``.

Not modelled: 4/8-bit bases (bitsandbytes saves its own tensors), packed batches' per-row position ids
(rotary x batch), CUDA sdpa in fp32 (no flash kernel; with GQA it falls back to the math kernel, which
saves the [b, heads, s, s] probabilities like eager), attention dropout (0 in Qwen configs), and anything
transient (gradients in flight during backward, the head's logits chunk: see ``loss_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Mirrors qwenloop.loss (this module imports no torch); tests/test_plan_activations.py checks they agree.
HEAD_CHUNK_TOKENS = 1024
CHUNK_TOKENS = 256

QWEN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP32 = 4  # RMSNorm statistics, softmax, log-sum-exp, the loss: always fp32
INDEX_BYTES = 8  # int64 target positions and labels


@dataclass(frozen=True)
class _Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool = False

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def fan(self, target: str) -> tuple[int, int]:
        h, i, q, kv = self.hidden, self.intermediate, self.q, self.kv
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[target]


def _get(shape, *names):
    for name in names:
        value = shape.get(name) if isinstance(shape, dict) else getattr(shape, name, None)
        if value is not None:
            return int(value)
    return None


def dims(shape) -> _Dims:
    """The dimensions that matter here, from a ``plan.shapes.ModelSpec``, a ``flops.DecoderShape`` (or any
    object or dict with ``hidden``, ``intermediate``, ``layers``, ``heads``, ``kv_heads``, ``head_dim``,
    ``vocab``), or a transformers config (``text_config`` when nested). ``has_qk_norm`` (Qwen3) when given."""
    shape = getattr(shape, "text_config", None) or shape
    hidden = _get(shape, "hidden", "hidden_size")
    heads = _get(shape, "heads", "num_heads", "num_attention_heads")
    qk_norm = shape.get("has_qk_norm") if isinstance(shape, dict) else getattr(shape, "has_qk_norm", None)
    if qk_norm is None:  # a transformers config: Qwen3 has per-head q/k norms
        model_type = shape.get("model_type") if isinstance(shape, dict) else getattr(shape, "model_type", None)
        qk_norm = model_type == "qwen3"
    return _Dims(
        hidden=hidden,
        intermediate=_get(shape, "intermediate", "intermediate_size"),
        layers=_get(shape, "layers", "num_layers", "num_hidden_layers"),
        heads=heads,
        kv_heads=_get(shape, "kv_heads", "num_kv_heads", "num_key_value_heads") or heads,
        head_dim=_get(shape, "head_dim") or hidden // heads,
        vocab=_get(shape, "vocab", "vocab_size"),
        qk_norm=bool(qk_norm),
    )


def _dropout_mask_bytes(device: str, lora_dtype_bytes: int) -> int:
    # CUDA (and XPU, ...) run the fused native_dropout, which saves a bool mask; the CPU's dropout is
    # `x * noise` with the scaled noise in x's dtype, and x is in the LoRA dtype by then.
    return lora_dtype_bytes if device == "cpu" else 1


def layer_saved_breakdown(shape, batch: int, seq: int, dtype_bytes: int, lora_r: int = 16,
                          lora_dropout: float = 0.05, attn: str = "sdpa", lora_targets=QWEN_LORA_TARGETS,
                          lora_dtype_bytes: int = 4, attention_mask: bool = False, device: str = "cuda",
                          input_requires_grad: bool = True) -> dict[str, int]:
    """Bytes one decoder layer saves for backward without checkpointing, by part: ``norms``, ``attention``,
    ``qk_norm`` (Qwen3), ``mlp``, ``lora`` (the module docstring says where each factor comes from).

    With LoRA on all 7 projections and sdpa without a padding mask, that is, per layer:

    * fp32, no dropout: ``T*[2*(h+1)*4 + (2q + 2kv)*4 + 3i*4 + 7r*4 + (2h + i)*4] + b*heads*s*4``
      (the last bracket: the norm outputs and the MLP product, kept once each by the LoRA ``lora_A``);
    * fp32, dropout, CUDA: ``T*[2*(h+1)*4 + (2q + 2kv)*4 + 3i*4 + 7r*4 + sum_p n_p*(4 + 1)] + b*heads*s*4``;
    * bf16 autocast, dropout, CUDA: ``T*[2*(h+1)*4 + (2q + 2kv)*2 + 3i*2 + 7r*2 + sum_p n_p*(2 + 1)]
      + b*heads*s*4 + sum_p r*(n_p + m_p)*2`` (without dropout: ``n_p*2`` per projection, no mask);

    ``sum_p n_p = 5h + q + i`` over the 7 projections' input widths. ``input_requires_grad=False`` is the
    first layer behind a frozen embedding (no input-norm term, no q/k/v dropout masks)."""
    d = dims(shape)
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    b, s, c, la = batch, seq, dtype_bytes, lora_dtype_bytes
    t, h, i = b * s, d.hidden, d.intermediate
    targets = [x for x in lora_targets if x in QWEN_LORA_TARGETS] if lora_r > 0 else []
    autocast = c != la
    dropout = lora_dropout > 0
    mask_bytes = _dropout_mask_bytes(device, la)

    # RMSNorm: fp32 input (pow, x * rsqrt) + fp32 rsqrt [b, s, 1], for each of the two norms.
    norm = t * (h + 1) * FP32
    parts = {"norms": norm * (2 if input_requires_grad else 1)}

    # Attention kernel.
    if attn == "sdpa":
        kv_saved = d.q if attention_mask else d.kv  # repeat_kv when a mask rules out enable_gqa
        attention = t * d.q * c + 2 * t * kv_saved * c + t * d.q * c + b * d.heads * s * FP32
        if attention_mask:
            attention += b * s * s * c  # the bool mask as the float bias the kernel saves
    else:
        probs = b * d.heads * s * s
        attention = 3 * t * d.q * c + probs * FP32 + (probs * c if c != FP32 else 0)
    parts["attention"] = attention
    if d.qk_norm:
        # Qwen3's per-head RMSNorm on q and k: fp32 input and one fp32 rsqrt per head and position.
        parts["qk_norm"] = t * (d.q + d.heads) * FP32 + t * (d.kv + d.kv_heads) * FP32

    # MLP: silu's input, silu's output and up's output (the two factors of the product).
    parts["mlp"] = 3 * t * i * c

    # LoRA.
    lora = 0
    if targets:
        for target in targets:
            n, m = d.fan(target)
            # Does x need a gradient? Not for q, k, v behind a frozen embedding in the first layer: then
            # dropout records nothing (no mask saved) and lora_A needs its weight for no input gradient.
            grad_x = input_requires_grad or target not in ("q_proj", "k_proj", "v_proj")
            lora += t * lora_r * (c if autocast else la)  # lora_B's input
            if autocast:
                lora += t * n * c  # autocast's compute-dtype copy of x (dropped or not), saved by lora_A
                lora += lora_r * m * c + (lora_r * n * c if grad_x else 0)  # autocast's lora_B / lora_A copies
            elif dropout:
                lora += t * n * la  # the dropped copy of x, saved by lora_A
            if dropout and grad_x:
                lora += t * n * mask_bytes
        if not autocast and not dropout:
            # lora_A saves the projection's input itself: one storage per distinct input.
            shared = {"norm1": t * h * c if {"q_proj", "k_proj", "v_proj"} & set(targets) else 0,
                      # sdpa saved its output already; eager's contiguous copy is kept by o's lora_A only
                      "attn_out": t * d.q * c if "o_proj" in targets and attn == "eager" else 0,
                      "norm2": t * h * c if {"gate_proj", "up_proj"} & set(targets) else 0,
                      "mlp_product": t * i * c if "down_proj" in targets else 0}
            lora += sum(shared.values())
    parts["lora"] = lora
    return parts


def layer_saved_bytes(shape, batch: int, seq: int, dtype_bytes: int, **kwargs) -> int:
    """``sum(layer_saved_breakdown(...).values())``: one decoder layer's saved set without checkpointing."""
    return sum(layer_saved_breakdown(shape, batch, seq, dtype_bytes, **kwargs).values())


@dataclass(frozen=True)
class LossBytes:
    saved: int  # kept from forward to backward
    transient: int  # extra peak while the loss is computed (forward of the head, or backward of the fallback)


def loss_bytes(shape, batch: int, seq: int, dtype_bytes: int, targets: int | None = None,
               target_head: bool = True) -> LossBytes:
    """Memory of the LM head + loss for ``targets`` target positions (``None``: every position).

    Target-only head (``loss.TargetLossHead``, the default):

    * saved: the gradient with respect to the gathered hidden states, computed in the forward,
      ``targets * h * c`` (``empty_like(hidden)``: the hidden dtype), and the int64 ``target_index``
      that ``index_select`` saves, ``targets * 8``.
    * transient, per chunk of ``k = min(targets, HEAD_CHUNK_TOKENS)`` rows: the fp32 logits (softmax in
      place) ``k * V * 4``, plus under autocast the compute-dtype logits before ``.float()`` and the
      compute-dtype probabilities that multiply the head weight (never both at once): ``k * V * c``.

    Full-logits fallback (``token_loss_sum``):

    * saved: the logits ``b * s * V * c``, kept by the chunk checkpoints' saved inputs (the model
      returns them in the compute dtype), and the shifted int64 labels ``b * s * 8``;
    * transient (backward): the logits' gradient ``b * s * V * c`` plus, per recomputed chunk of
      ``k = min(b*s, CHUNK_TOKENS)`` rows, the fp32 logits, cross-entropy's saved log-softmax and its
      gradient, ``3 * k * V * 4``.
    """
    d = dims(shape)
    t = batch * seq
    c = dtype_bytes
    if target_head:
        n = t if targets is None else int(targets)
        k = min(n, HEAD_CHUNK_TOKENS)
        transient = k * d.vocab * FP32 + (k * d.vocab * c if c != FP32 else 0)
        return LossBytes(saved=n * d.hidden * c + n * INDEX_BYTES, transient=transient)
    logits = t * d.vocab * c
    k = min(t, CHUNK_TOKENS)
    return LossBytes(saved=logits + t * INDEX_BYTES, transient=logits + 3 * k * d.vocab * FP32)


def rope_bytes(shape, seq: int, dtype_bytes: int, rows: int = 1) -> int:
    """Rotary ``cos`` and ``sin`` ([rows, s, head_dim] in the compute dtype; one pair for all layers; ``rows``
    is 1 unless the batch carries per-row position ids, as packed batches do): ``2 * rows * s * head_dim * c``."""
    return 2 * rows * seq * dims(shape).head_dim * dtype_bytes


def saved_activations_breakdown(shape, batch: int, seq: int, dtype_bytes: int, lora_r: int = 16,
                                lora_dropout: float = 0.05, checkpointing: bool = False, attn: str = "sdpa",
                                targets: int | None = None, *, target_head: bool = True,
                                lora_targets=QWEN_LORA_TARGETS, lora_dtype_bytes: int = 4,
                                attention_mask: bool = False, device: str = "cuda",
                                first_layer_frozen_input: bool = True) -> dict[str, int]:
    """``saved_activations_bytes`` by part: ``layers``, ``rope``, ``mask``, ``final_norm``, ``loss``."""
    d = dims(shape)
    t = batch * seq
    mask = 0
    if checkpointing:
        layers = d.layers * t * d.hidden * dtype_bytes  # each checkpointed layer's input
        # The layers' keyword arguments stay referenced by the checkpoints until their backward: the rotary
        # cos/sin (counted below in both modes) and the 4D mask transformers builds: bool [b, 1, s, s] for
        # sdpa (only when there is padding), in the compute dtype for eager (always).
        if attn == "eager":
            mask = batch * seq * seq * dtype_bytes
        elif attention_mask:
            mask = batch * seq * seq
    else:
        kw = dict(lora_r=lora_r, lora_dropout=lora_dropout, attn=attn, lora_targets=lora_targets,
                  lora_dtype_bytes=lora_dtype_bytes, attention_mask=attention_mask, device=device)
        middle = layer_saved_bytes(shape, batch, seq, dtype_bytes, **kw)
        first = layer_saved_bytes(shape, batch, seq, dtype_bytes,
                                  input_requires_grad=not first_layer_frozen_input, **kw)
        layers = first + (d.layers - 1) * middle if d.layers else 0
    return {
        "layers": layers,
        "rope": rope_bytes(shape, seq, dtype_bytes),
        "mask": mask,
        "final_norm": t * (d.hidden + 1) * FP32,
        "loss": loss_bytes(shape, batch, seq, dtype_bytes, targets, target_head=target_head).saved,
    }


def saved_activations_bytes(shape, batch: int, seq: int, dtype_bytes: int, lora_r: int = 16,
                            lora_dropout: float = 0.05, checkpointing: bool = False, attn: str = "sdpa",
                            targets: int | None = None, **kwargs) -> int:
    """Bytes autograd keeps between the forward and the backward of one micro-batch ``[batch, seq]``.

    Without checkpointing: ``first_layer + (L - 1) * layer + rope + T*(h+1)*4 + loss.saved``, where
    ``layer = layer_saved_bytes(...)`` (norms ``2*T*(h+1)*4``, attention, MLP ``3*T*i*c``, LoRA: see the
    module docstring) and the first layer lacks its input norm's ``T*(h+1)*4`` behind a frozen embedding.

    With non-reentrant checkpointing: ``L * T*h*c`` (each layer's input, saved by the checkpoint)
    ``+ rope + mask + T*(h+1)*4 + loss.saved``, ``mask`` being the attention mask the checkpoints keep
    referenced (``b*s*s`` bool for sdpa with padding, ``b*s*s*c`` for eager, else none).

    ``targets``: target positions of the batch (``None``: all ``batch*seq``). Keyword-only extras:
    ``target_head`` (False: the full-logits fallback), ``lora_targets``, ``lora_dtype_bytes`` (4),
    ``attention_mask`` (a padding mask reaches attention), ``device`` ("cuda" or "cpu": dropout masks),
    ``first_layer_frozen_input`` (False after ``enable_input_require_grads``).
    """
    parts = saved_activations_breakdown(shape, batch, seq, dtype_bytes, lora_r, lora_dropout, checkpointing, attn,
                                        targets, **kwargs)
    return sum(parts.values())


def recompute_working_set_bytes(shape, batch: int, seq: int, dtype_bytes: int, lora_r: int = 16,
                                lora_dropout: float = 0.05, attn: str = "sdpa", **kwargs) -> int:
    """Extra memory while the backward of one checkpointed layer runs: non-reentrant checkpointing replays
    the layer's forward and holds every tensor it saves until that layer's backward is done, i.e. one
    layer's full no-checkpoint saved set, ``layer_saved_bytes(...)`` (the first layer too: transformers'
    checkpointing makes the embedding output require grad). Keyword extras as ``layer_saved_breakdown``;
    the gradients in flight come on top."""
    return layer_saved_bytes(shape, batch, seq, dtype_bytes, lora_r=lora_r, lora_dropout=lora_dropout, attn=attn,
                             **kwargs)
