"""The training loss: summed next-token cross-entropy over target tokens, in fp32, without ever
building the [tokens x vocab] logits of the whole batch.

Qwen's vocabulary has ~152k entries, so the LM head is most of the compute of a small model and its
logits most of the memory of a big one (0.6 GB of fp32 per 1k positions, and as much again for their
gradient). Two ways to compute the loss live here:

* ``TargetLossHead`` (the default, ``lm_head_targets_only: true``): the model's ``lm_head`` module,
  given the batch's target positions, gathers the hidden states whose next token is a target and runs
  the head + fp32 cross-entropy on those rows only, in chunks; the gradient with respect to the hidden
  states is computed chunk by chunk in the same pass (``_TargetCrossEntropy``), so neither the logits
  nor their gradient outlive a chunk and nothing is recomputed in backward. Prompt, padding and
  masked positions cost no LM-head FLOPs. It runs *inside* the head's forward, so every backend's
  hooks on the head (ZeRO-3's parameter gather, FSDP's unshard) fire as for any module call.
* ``token_loss_sum(logits, labels)``: the model's full logits, reduced in fp32 chunks each recomputed
  in backward (the fallback when the head cannot be replaced, e.g. LoRA on ``lm_head``).

Both give sum(-log p(label)) over the targets; the loop divides by the step's target count.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX, MODEL_INPUTS

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 256  # full-logits path: 256 x 152k x 4 B = 0.15 GB of fp32 at a time
HEAD_CHUNK_TOKENS = 1024  # target rows per LM-head chunk: ~0.6 GB of fp32 logits at 152k, big enough for fast GEMMs


# ------------------------------------------------------------------------------------------------
# LM head + loss at target positions only
# ------------------------------------------------------------------------------------------------


class _TargetCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T + bias, labels[i]) in fp32, chunk by chunk, with d/d hidden
    computed in the forward pass (softmax - one_hot) @ weight, as fused linear-cross-entropy kernels
    (Liger, cut-cross-entropy) do: the backward is then one multiply, the chunk's logits are freed
    at once, and the frozen head weight is not needed again (no recompute, no second gather)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            # log-sum-exp and softmax in place, one pass each over the [chunk, vocab] block: with a 152k
            # vocabulary these passes, not the matmuls, are what a naive logsumexp + softmax costs twice.
            row_max = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            sum_exp = exp.sum(dim=-1)
            total += (row_max.squeeze(1) + sum_exp.log() - target_logit).sum()
            if need_grad:
                probs = exp.div_(sum_exp[:, None])
                probs[torch.arange(y.numel(), device=y.device), y] -= 1.0  # softmax - one_hot = dCE/dlogits
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
            del logits, exp
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


class TargetLossHead(torch.nn.Linear):
    """The model's ``lm_head`` (an ``nn.Linear``, class swapped in place: same parameters, same name,
    same hooks). Without targets it is the plain head (generation, logits). Inside
    ``with head.targets(index, labels)`` its forward returns the summed fp32 loss of those targets
    instead of logits, so ``model(...).logits`` is that loss."""

    _targets: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def targets(self, index: torch.Tensor, labels: torch.Tensor):
        self._targets = (index, labels)
        try:
            yield
        finally:
            self._targets = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            return super().forward(hidden_states)
        index, labels = self._targets
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, index)
        return _TargetCrossEntropy.apply(rows, self.weight, self.bias, labels, HEAD_CHUNK_TOKENS)


def install_target_loss_head(model) -> TargetLossHead | None:
    """Turn the model's output layer into a ``TargetLossHead``; None (and the full-logits path) when it
    is not a plain trainable-free ``nn.Linear`` (LoRA or a quantized layer on ``lm_head``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if isinstance(head, TargetLossHead):
        return head
    if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
        logger.warning(
            "lm_head_targets_only: the output layer is a %s with trainable=%s, not a frozen nn.Linear; computing "
            "full logits instead", type(head).__name__, any(p.requires_grad for p in head.parameters()),
        )
        return None
    head.__class__ = TargetLossHead
    return head


def find_target_loss_head(model) -> TargetLossHead | None:
    """The model's ``TargetLossHead``, through any wrapper (DDP, DeepSpeed engine, FSDP, PEFT)."""
    for module in model.modules():
        if isinstance(module, TargetLossHead):
            return module
    return None


# ------------------------------------------------------------------------------------------------
# one micro-batch
# ------------------------------------------------------------------------------------------------


def batch_loss_sum(model, batch: dict, head: TargetLossHead | None) -> torch.Tensor:
    """Summed fp32 loss of one collated batch (``data.finish_batch``): through the target-only head
    when there is one, else from the model's full logits. Call it under ``accelerator.autocast()``."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if head is not None:
        with head.targets(batch["target_index"], batch["target_labels"]):
            return model(**inputs).logits  # the head returned the loss (0-dim, fp32)
    return token_loss_sum(model(**inputs).logits, batch["labels"])


# ------------------------------------------------------------------------------------------------
# the full-logits fallback
# ------------------------------------------------------------------------------------------------


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Sum over target positions of -log p(label), in fp32. ``logits`` [batch, seq, vocab] predict
    ``labels`` [batch, seq] shifted by one (the usual causal-LM alignment); -100 labels are ignored.

    The labels are shifted, not the logits: ``logits[:, :-1]`` would copy the whole logits tensor and
    its backward would build a zero-filled full-size gradient."""
    vocab = logits.size(-1)
    flat_logits = logits.reshape(-1, vocab)  # a view: logits are contiguous
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat_labels = shifted.to(logits.device).reshape(-1)
    total = logits.new_zeros((), dtype=torch.float32)
    for piece, piece_labels in zip(flat_logits.split(chunk_tokens), flat_labels.split(chunk_tokens)):
        if piece.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, piece, piece_labels, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(piece, piece_labels)
    return total


def _chunk_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
