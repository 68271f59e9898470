"""The chunked fp32 loss equals the plain full-tensor cross-entropy, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from qwenloop.loss import count_targets, token_loss_sum


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_loss_matches_full_cross_entropy(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 17, 50, generator=g) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[:, :9] = -100  # a prompt: whole chunks without targets are skipped
    labels[2, 12:] = -100  # padding
    ours = token_loss_sum(logits, labels, chunk_tokens=chunk)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = reference(logits, labels)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(grad_ours.float(), grad_ref.float(), rtol=1e-5, atol=1e-6)


def test_no_target_gives_zero_loss_that_still_backpropagates():
    logits = torch.randn(1, 5, 10, requires_grad=True)
    labels = torch.full((1, 5), -100)
    loss = token_loss_sum(logits, labels)
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None and logits.grad.abs().sum() == 0


def test_count_targets_skips_the_unpredicted_first_position():
    assert count_targets({"labels": torch.tensor([[5, 6, -100, 7]])}) == 2
