"""Peak memory of the loss over Qwen-sized logits: plain fp32 cross-entropy vs qwenloop's chunked loss.

Each variant runs in its own process (peak RSS is per process) on bf16 logits of [1, T, 151936]
(Qwen2.5's vocabulary) with a backward pass, and prints the peak resident memory above the logits.

    python bench/loss_memory.py            # T = 2048
    python bench/loss_memory.py 4096
"""

import resource
import subprocess
import sys

VOCAB = 151936


def measure(variant: str, tokens: int) -> None:
    import torch
    import torch.nn.functional as F

    from qwenloop.loss import token_loss_sum

    torch.manual_seed(0)
    logits = torch.randn(1, tokens, VOCAB, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "plain":
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    else:
        loss = token_loss_sum(logits, labels)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{variant:8s} T={tokens}: logits {logits.numel() * 2 / 2**30:.2f} GiB (bf16), "
          f"peak RSS above them {(peak - base) / 2**20:.2f} GiB, loss {loss.item():.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        measure(sys.argv[1], int(sys.argv[2]))
    else:
        tokens = sys.argv[1] if len(sys.argv) > 1 else "2048"
        for variant in ("plain", "chunked"):
            subprocess.run([sys.executable, __file__, variant, tokens], check=True)
