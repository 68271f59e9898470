"""Both losses (the target-only LM head and the chunked full-logits one) equal the plain full-tensor
cross-entropy, in value and gradient; the target-only head spends its FLOPs on targets only."""

import pytest
import torch
import torch.nn.functional as F

from qwenloop import loss as loss_lib
from qwenloop.data import PaddingCollator
from qwenloop.loss import TargetLossHead, token_loss_sum


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_loss_matches_full_cross_entropy(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 17, 50, generator=g) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[:, :9] = -100  # a prompt
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


def test_collated_targets_skip_the_unpredicted_first_position():
    """A label at position t is predicted from t-1: the first label never is, and padding is no target."""
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=1)(
        [{"input_ids": [1, 2, 3, 4], "labels": [5, 6, -100, 7]}, {"input_ids": [8], "labels": [9]}])
    assert batch["num_targets"] == 2 and batch["target_labels"].tolist() == [6, 7]
    assert batch["target_index"].tolist() == [0, 2]  # the hidden states at (row 0, col 0) and (row 0, col 2)
    assert (batch["num_tokens"], batch["num_positions"], batch["attention_pairs"]) == (5, 8, 10 + 1)


# ------------------------------------------------------------------------------------------------
# the target-only LM head
# ------------------------------------------------------------------------------------------------


def _padded_batch(lengths, prompt, vocab, seed=0):
    """A collated batch of examples of the given lengths whose first `prompt` tokens are not targets."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)


def _head(hidden_size, vocab, bias, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden_size, vocab, bias=bias).to(dtype).requires_grad_(False)
    head.__class__ = TargetLossHead
    return head


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_target_head_equals_cross_entropy_of_full_logits(monkeypatch, bias, chunk):
    monkeypatch.setattr(loss_lib, "HEAD_CHUNK_TOKENS", chunk)
    batch = _padded_batch([13, 29, 7], prompt=5, vocab=97)
    head = _head(16, 97, bias)
    hidden = torch.randn(*batch["input_ids"].shape, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with head.targets(batch["target_index"], batch["target_labels"]):
        ours = head(hidden)
    (grad_ours,) = torch.autograd.grad(ours * 0.5, hidden)  # a scale, as the loop's normalisation
    ref = reference(torch.nn.Linear.forward(head, hidden), batch["labels"])
    (grad_ref,) = torch.autograd.grad(ref * 0.5, hidden)
    assert batch["num_targets"] == 8 + 24 + 2
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)
    assert grad_ref.abs().sum() > 0


def test_target_head_in_bf16_stays_close_to_fp32():
    batch = _padded_batch([40, 33], prompt=10, vocab=211)
    head32, head16 = _head(32, 211, False), _head(32, 211, False, torch.bfloat16)
    hidden = torch.randn(*batch["input_ids"].shape, 32, generator=torch.Generator().manual_seed(3))
    with head32.targets(batch["target_index"], batch["target_labels"]), head16.targets(batch["target_index"], batch["target_labels"]):
        full, half = head32(hidden), head16(hidden.bfloat16())
    assert half.dtype == torch.float32  # the cross-entropy is always fp32
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


def test_target_head_flops_follow_targets_not_positions():
    """The LM head's matmuls run on target rows only: 2*H*V per target forward, 2*H*V for the hidden
    states' gradient; padding and prompt positions cost nothing (the full-logits path pays for all)."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden_size, vocab = 16, 500
    batch = _padded_batch([60, 9, 9, 9], prompt=8, vocab=vocab)  # much padding, long prompts
    head = _head(hidden_size, vocab, bias=False)
    hidden = torch.randn(*batch["input_ids"].shape, hidden_size, requires_grad=True)
    with FlopCounterMode(display=False) as counted:
        with head.targets(batch["target_index"], batch["target_labels"]):
            head(hidden).backward()
    assert counted.get_total_flops() == 4 * hidden_size * vocab * batch["num_targets"]
    with FlopCounterMode(display=False) as full:
        token_loss_sum(torch.nn.Linear.forward(head, hidden), batch["labels"]).backward()
    assert full.get_total_flops() >= 4 * hidden_size * vocab * batch["num_positions"]
    assert batch["num_positions"] > 4 * batch["num_targets"]  # so that the two counts differ by that much


def test_target_head_without_targets_is_the_plain_head():
    head = _head(8, 20, bias=True)
    x = torch.randn(2, 3, 8)
    assert torch.equal(head(x), F.linear(x, head.weight, head.bias))


def test_target_head_with_no_target_gives_zero_that_backpropagates():
    head = _head(8, 20, bias=False)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    with head.targets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
        out = head(hidden)
    out.backward()
    assert out.item() == 0 and hidden.grad is not None and hidden.grad.abs().sum() == 0
