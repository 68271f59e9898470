"""The planner's activation term (``qwenloop.plan.activations``) against what a real forward keeps for backward.

Random-init models with real widths (Qwen2.5-0.5B, 1.5B, 3B and Qwen3-0.6B; the real 151936-token vocabulary,
tied head) but 2 layers, LoRA r16 on the 7 projections applied as qwenloop applies it (``model.add_lora``), the
loss through the real ``TargetLossHead`` on a ``PaddingCollator`` batch whose second halves are targets. fp32
on the CPU, plus bf16 base weights under CPU autocast (fp32 LoRA weights, as ``model._finish`` makes them),
which casts like CUDA autocast does.

One forward runs under ``torch.autograd.graph.saved_tensors_hooks``: the pack hook sees every tensor autograd
saves and records its storage. What occupies memory between forward and backward is the set of *unique
storages that are not parameters*: a saved weight is the parameter itself, and views (``q.transpose``, the
reshape into ``o_proj``) or one tensor saved by several ops (the norm output kept by three ``lora_A``) share
one storage. That is what the formulas must match, within 10% (they match to the byte today).

Under non-reentrant checkpointing the checkpoint pushes its own ``saved_tensors_hooks`` inside each layer
(hooks do not nest: the innermost pair handles a save), so the ops inside a checkpointed layer never reach
our hook and their saves become empty placeholders; the layer's input is saved by the checkpoint itself,
outside its hooks, so through ours. The layer's keyword arguments (rotary cos/sin, the 4D attention mask)
are not saved tensors but stay referenced by the checkpoint until backward: they are found with weak
references after the forward and counted when still alive.

A forward pre-hook on each decoder layer tags the storages first saved while it runs, so the second layer's
saved set (what one checkpointed layer brings back during its backward: the recompute working set) is
checked on its own too.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass

import pytest
import torch

from qwenloop.plan import activations as act

VOCAB = 151936
# Real widths (config.json of Qwen/Qwen2.5-{0.5B,1.5B,3B} and Qwen/Qwen3-0.6B), 2 layers. Qwen3 adds per-head
# q/k norms and a head_dim (128) that is not hidden / heads.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128),
}
LAYERS = 2
TOLERANCE = 0.10
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_models: dict = {}


def _model(shape: str, dropout: float, dtype: str = "fp32"):
    """A PEFT model (LoRA r16 on q,k,v,o,gate,up,down, ``dropout``; LoRA weights fp32) with the target-only
    head, in train mode, built once per (shape, dtype)."""
    key = (shape, dtype)
    if key not in _models:
        from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

        from qwenloop.config import LoraSettings
        from qwenloop.loss import install_target_loss_head
        from qwenloop.model import add_lora

        torch.manual_seed(0)
        config_class = Qwen3Config if shape.startswith("qwen3") else Qwen2Config
        config = config_class(**SHAPES[shape], num_hidden_layers=LAYERS, vocab_size=VOCAB, tie_word_embeddings=True,
                              use_cache=False)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=DTYPES[dtype])
        model = add_lora(model, LoraSettings(r=16, dropout=0.05))
        for param in model.parameters():  # as model._finish: trainable weights in fp32
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        head = install_target_loss_head(model)
        assert head is not None
        model.train()
        _models[key] = (model, head)
    model, head = _models[key]
    _set_lora_dropout(model, dropout)
    return model, head


def _set_lora_dropout(model, p: float) -> None:
    """What PEFT builds for ``lora_dropout=p``: ``nn.Dropout(p)``, or ``nn.Identity()`` when ``p == 0``."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in list(module.lora_dropout.keys()):
                module.lora_dropout[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def _batch(lengths: list[int]) -> dict:
    from qwenloop.data import PaddingCollator

    g = torch.Generator().manual_seed(sum(lengths))
    examples = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return PaddingCollator(pad_token_id=0)(examples)


@dataclass
class Saved:
    total: int  # unique non-parameter storages alive for backward
    by_part: dict  # the same, by where they were first saved: "layer0", "layer1", "outside", "kept" (kwargs)


def _measure(model, head, batch, target_head: bool = True, dtype: str = "fp32") -> Saved:
    """Run one forward (and the loss) under saved-tensor hooks; count unique non-parameter storages."""
    from qwenloop.loss import token_loss_sum

    base = model.get_base_model()
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    frozen |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, tuple[int, str]] = {}
    where = ["outside"]
    kwarg_refs: list[weakref.ref] = []

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # Keyed by storage address: the hook returns the tensor, so every saved storage stays alive (and its
        # address unique) until the forward is over.
        if ptr not in frozen and ptr not in seen and storage.nbytes():
            seen[ptr] = (storage.nbytes(), where[0])
        return t

    def tagger(name):
        def pre(module, args, kwargs):
            where[0] = name
            for key in ("attention_mask", "position_embeddings"):
                value = kwargs.get(key)
                for tensor in value if isinstance(value, tuple) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        kwarg_refs.append(weakref.ref(tensor))

        def post(module, args, kwargs, out):
            where[0] = "outside"
        return pre, post

    handles = []
    for i, layer in enumerate(base.model.layers):
        pre, post = tagger(f"layer{i}")
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True, always_call=True))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    autocast = torch.autocast("cpu", dtype=DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            if target_head:
                with head.targets(batch["target_index"], batch["target_labels"]):
                    loss = model(**inputs).logits
            else:
                loss = token_loss_sum(model(**inputs).logits, batch["labels"])
    finally:
        for h in handles:
            h.remove()
    assert loss.requires_grad and loss.ndim == 0
    # Still alive with the loss (reference counting frees the rest at once): held for the backward, by
    # checkpoints' closures.
    for ref in kwarg_refs:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = (storage.nbytes(), "kept")
    by_part: dict[str, int] = {}
    for nbytes, part in seen.values():
        by_part[part] = by_part.get(part, 0) + nbytes
    return Saved(sum(by_part.values()), by_part)


def _set_mode(model, checkpointing: bool, attn: str) -> None:
    """As ``model._finish`` sets the model up. transformers' ``activation_checkpointing_enable`` also makes the
    embedding's output require grad (``enable_input_require_grads``); qwenloop without checkpointing has no
    such hook, so it goes again with the checkpointing."""
    base = model.get_base_model()
    if checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()
    base.set_attn_implementation(attn)


def _spec(shape: str):
    s = SHAPES[shape]
    return dict(hidden=s["hidden_size"], intermediate=s["intermediate_size"], layers=LAYERS,
                heads=s["num_attention_heads"], kv_heads=s["num_key_value_heads"],
                head_dim=s.get("head_dim", s["hidden_size"] // s["num_attention_heads"]), vocab=VOCAB,
                has_qk_norm=shape.startswith("qwen3"))


def _close(predicted: int, measured: int) -> bool:
    return abs(predicted - measured) <= TOLERANCE * measured


# (shape, lengths of the batch's examples, checkpointing, attention, LoRA dropout, base dtype)
CASES = [
    ("0.5b", [128], False, "sdpa", 0.05, "fp32"),
    ("0.5b", [128], True, "sdpa", 0.05, "fp32"),
    ("0.5b", [256, 256], False, "sdpa", 0.05, "fp32"),
    ("0.5b", [256, 256], True, "sdpa", 0.05, "fp32"),
    ("0.5b", [512], False, "sdpa", 0.05, "fp32"),
    ("0.5b", [512], True, "sdpa", 0.05, "fp32"),
    ("0.5b", [256], False, "eager", 0.05, "fp32"),
    ("0.5b", [256], True, "eager", 0.05, "fp32"),
    ("0.5b", [256, 200], False, "sdpa", 0.05, "fp32"),  # padding: a mask reaches attention
    ("0.5b", [256, 200], True, "sdpa", 0.05, "fp32"),
    ("0.5b", [256, 256], False, "sdpa", 0.0, "fp32"),
    ("0.5b", [256, 256], False, "sdpa", 0.05, "bf16"),
    ("0.5b", [256, 256], True, "sdpa", 0.05, "bf16"),
    ("0.5b", [256], False, "eager", 0.05, "bf16"),
    ("0.5b", [256, 256], False, "sdpa", 0.0, "bf16"),
    ("1.5b", [128, 128], False, "sdpa", 0.05, "fp32"),
    ("1.5b", [128, 128], True, "sdpa", 0.05, "fp32"),
    ("3b", [256], False, "sdpa", 0.05, "fp32"),
    ("3b", [256], True, "sdpa", 0.05, "fp32"),
    ("qwen3-0.6b", [256], False, "sdpa", 0.05, "fp32"),
]


def _case_id(case) -> str:
    shape, lengths, checkpointing, attn, dropout, dtype = case
    pad = "-pad" if len(set(lengths)) > 1 else ""
    mode = "ckpt" if checkpointing else "full"
    return f"{shape}-b{len(lengths)}s{max(lengths)}{pad}-{mode}-{attn}-p{dropout}-{dtype}"


@pytest.mark.parametrize("shape,lengths,checkpointing,attn,dropout,dtype", CASES, ids=[_case_id(c) for c in CASES])
def test_saved_activations_match_a_real_forward(shape, lengths, checkpointing, attn, dropout, dtype):
    model, head = _model(shape, dropout, dtype)
    _set_mode(model, checkpointing, attn)
    batch = _batch(lengths)
    b, s = batch["input_ids"].shape
    start = time.perf_counter()
    saved = _measure(model, head, batch, dtype=dtype)
    elapsed = time.perf_counter() - start
    c = DTYPES[dtype].itemsize
    kw = dict(lora_r=16, lora_dropout=dropout, attn=attn, device="cpu", attention_mask=len(set(lengths)) > 1)
    predicted = act.saved_activations_bytes(_spec(shape), b, s, c, checkpointing=checkpointing,
                                            targets=batch["num_targets"], **kw)
    print(f"\n{_case_id((shape, lengths, checkpointing, attn, dropout, dtype))}: measured {saved.total} "
          f"predicted {predicted} ({predicted / saved.total - 1:+.2%}) {saved.by_part} forward {elapsed:.1f}s")
    assert _close(predicted, saved.total), (predicted, saved)
    if not checkpointing:
        # The second layer's own saved set: what its recompute brings back under checkpointing.
        working = act.recompute_working_set_bytes(_spec(shape), b, s, c, **kw)
        assert _close(working, saved.by_part["layer1"]), (working, saved.by_part)


def test_full_logits_fallback_saves_the_logits():
    model, head = _model("0.5b", 0.05)
    _set_mode(model, True, "sdpa")
    batch = _batch([128])
    saved = _measure(model, head, batch, target_head=False)
    predicted = act.saved_activations_bytes(_spec("0.5b"), 1, 128, 4, 16, 0.05, checkpointing=True, device="cpu",
                                            target_head=False)
    print(f"\nfull logits: measured {saved.total} predicted {predicted} {saved.by_part}")
    assert _close(predicted, saved.total), (predicted, saved)


def test_loss_terms():
    """The target head keeps ``[targets, hidden]`` and an index; its transient is one chunk of logits."""
    from qwenloop import loss as loss_lib

    assert act.HEAD_CHUNK_TOKENS == loss_lib.HEAD_CHUNK_TOKENS and act.CHUNK_TOKENS == loss_lib.CHUNK_TOKENS
    spec = _spec("0.5b")
    head = act.loss_bytes(spec, 4, 2048, 2, targets=3000)
    assert head.saved == 3000 * 896 * 2 + 3000 * 8
    assert head.transient == 1024 * VOCAB * (4 + 2)
    assert act.loss_bytes(spec, 1, 100, 4, targets=100).transient == 100 * VOCAB * 4
    full = act.loss_bytes(spec, 4, 2048, 2, target_head=False)
    assert full.saved == 4 * 2048 * VOCAB * 2 + 4 * 2048 * 8 and full.saved > 100 * head.saved


def test_shapes_from_specs_and_configs_agree():
    from transformers import Qwen2Config, Qwen3Config

    from qwenloop.flops import decoder_shape

    config = Qwen2Config(**SHAPES["1.5b"], num_hidden_layers=28, vocab_size=VOCAB)
    for shape in (config, decoder_shape(config), dict(_spec("1.5b"), layers=28)):
        d = act.dims(shape)
        assert (d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads, d.head_dim, d.vocab, d.qk_norm) == \
               (1536, 8960, 28, 12, 2, 128, VOCAB, False)
    qwen3 = act.dims(Qwen3Config(**SHAPES["qwen3-0.6b"], num_hidden_layers=28, vocab_size=VOCAB))
    assert (qwen3.q, qwen3.kv, qwen3.qk_norm) == (2048, 1024, True)
    try:
        from qwenloop.plan.shapes import PRESETS
    except ImportError:  # pragma: no cover - the planner's shapes module lands separately
        return
    for name, expected in (("qwen2.5-3b", (2048, 11008, 36, 16, 2, 128, False)),
                           ("qwen3-0.6b", (1024, 3072, 28, 16, 8, 128, True))):
        if name in PRESETS:
            d = act.dims(PRESETS[name])
            assert (d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads, d.head_dim, d.qk_norm) == expected


def test_checkpointing_is_the_layer_inputs_plus_the_tail():
    spec = dict(_spec("3b"), layers=36)
    kw = dict(lora_r=16, lora_dropout=0.05, targets=2048)
    on = act.saved_activations_bytes(spec, 4, 1024, 2, checkpointing=True, **kw)
    off = act.saved_activations_bytes(spec, 4, 1024, 2, checkpointing=False, **kw)
    tail = act.rope_bytes(spec, 1024, 2) + 4 * 1024 * (2048 + 1) * 4 + act.loss_bytes(spec, 4, 1024, 2, 2048).saved
    assert on == 36 * 4 * 1024 * 2048 * 2 + tail
    assert off > 10 * on
    assert act.recompute_working_set_bytes(spec, 4, 1024, 2) == act.layer_saved_bytes(spec, 4, 1024, 2)
