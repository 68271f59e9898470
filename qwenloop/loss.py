"""The training loss: summed next-token cross-entropy over target tokens, computed in fp32 chunks.

Qwen's vocabulary has ~152k entries. Upcasting a whole [tokens, vocab] logits tensor to fp32 costs
~0.6 GB per 1k tokens, and autograd keeps that copy (log-softmax saves its fp32 output) until the
backward pass. Here each chunk of positions is upcast, reduced to a scalar and recomputed in the
backward pass (activation checkpointing of the loss alone), so no fp32 copy of the logits outlives
its chunk. `bench/loss_memory.py` measures it (CPU, bf16 logits of Qwen2.5's vocabulary, peak memory
above the logits for forward + backward): 3.5 -> 1.2 GiB at 2k tokens, 7.0 -> 2.4 GiB at 4k. What
remains is mostly the logits' own gradient, which only a fused lm_head + loss kernel would avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

CHUNK_TOKENS = 256  # positions per chunk: 256 x 152k x 4 B = 0.15 GB of fp32 at a time


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Sum over target positions of -log p(label), in fp32. ``logits`` [batch, seq, vocab] predict
    ``labels`` [batch, seq] shifted by one (the usual causal-LM alignment); -100 labels are ignored."""
    vocab = logits.size(-1)
    shift_logits = logits[:, :-1, :].reshape(-1, vocab)
    shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
    total = logits.new_zeros((), dtype=torch.float32)
    # One split (not repeated slicing): its backward writes every chunk's gradient into a single
    # tensor instead of a zero-filled full-size one per chunk.
    for piece, piece_labels in zip(shift_logits.split(chunk_tokens), shift_labels.split(chunk_tokens)):
        if not bool((piece_labels != IGNORE_INDEX).any()):
            continue  # prompt-only chunk: contributes nothing, costs nothing
        if piece.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, piece, piece_labels, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(piece, piece_labels)
    if logits.requires_grad and not total.requires_grad:
        total = total + shift_logits[:0].sum()  # no target at all: still a (zero) gradient path to backward
    return total


def _chunk_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(batch) -> int:
    """Target tokens of a batch: positions whose label is predicted (all but the first)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
