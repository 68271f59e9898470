"""How tokenized examples become micro-batches: padded (``make_dataloader``'s default), length-grouped,
or packed without cross-talk.

Grouping and packing both cut the compute spent on padding. *Packing* concatenates several examples into one row of at
most ``max_len`` tokens; *length grouping* keeps unpacked examples but batches those of similar
length together.

Packing must not let one example see another: every example of a row restarts its
``position_ids`` at 0 and the batch carries **no** ``attention_mask``. transformers (5.x) then finds
the example boundaries from the ``position_ids`` (``masking_utils.find_packed_sequence_indices``)
and builds a block-causal mask (sdpa, eager, flex). Two things silently turn that detection off, and
attention then crosses examples with no error:

* a 2D ``attention_mask`` (even all ones), and
* a KV cache: the model makes one whenever ``use_cache`` is true (``config.use_cache`` is true in
  every Qwen checkpoint), and with a cache the position ids are not looked at.

Flash-attention kernels detect packing from the position ids only for a batch of ONE row.
``check_packing_support`` refuses these set-ups. The loss must not cross examples either: see
``PackingCollator``.

Every order here is a function of (seed, epoch) only: the same on every rank (accelerate hands the
micro-batches of the prepared loader out round-robin) and in every run (exact resume).
"""

from __future__ import annotations

import bisect
import heapq
from typing import Iterator, Sequence

import torch

from .data import IGNORE_INDEX, EpochShuffleSampler, PaddingCollator, TokenizedData, finish_batch

# Attention implementations whose masks honour packed position ids for any number of rows.
_MASKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def pack_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Assign example indices to rows of at most ``max_len`` tokens (best-fit decreasing).

    Examples are placed longest first (ties: lower index first), each into the open row whose free
    space is the smallest that still fits it (ties: the row opened first), else into a new row. This
    fills rows to within a few percent of ``ceil(sum(lengths) / max_len)`` on real length mixes.
    The result depends only on the inputs, so every rank and every resumed run packs alike.

    Free capacities are kept as a sorted list of the *distinct* values in use (at most ``max_len``
    of them), each with a heap of the rows that have it: a placement is a bisect plus heap
    operations, so a million examples take seconds, not the hours a scan over all rows would.

    Inside a row the example indices are in ascending order. An example longer than ``max_len``
    (or empty) is a ``ValueError``: the data module truncates or drops such examples before.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len={max_len}; truncate or drop it first")
        if n < 1:
            raise ValueError(f"example {i} is empty; it cannot be packed")

    rows: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free capacities of open rows
    rows_with_free: dict[int, list[int]] = {}  # free capacity -> heap of row ids
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        at = bisect.bisect_left(free_values, n)
        if at < len(free_values):  # the tightest row it fits into
            free = free_values[at]
            heap = rows_with_free[free]
            row = heapq.heappop(heap)
            if not heap:
                del rows_with_free[free]
                del free_values[at]
        else:
            free, row = max_len, len(rows)
            rows.append([])
        rows[row].append(i)
        left = free - n
        if left > 0:  # a full row can take nothing more: forget it
            if left not in rows_with_free:
                rows_with_free[left] = []
                bisect.insort(free_values, left)
            heapq.heappush(rows_with_free[left], row)
    for row in rows:
        row.sort()
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """The rows of a packing as a map-style dataset: item ``i`` is the list of row ``i``'s examples.

    Each example is ``{"input_ids": [...], "labels": [...]}``; ``PackingCollator`` concatenates
    them. The two columns are read into Python lists once, up front: indexing an Arrow-backed
    ``datasets.Dataset`` example by example is far slower than a list, and a row needs several.
    """

    def __init__(self, dataset, rows: list[list[int]]):
        self.input_ids = list(dataset["input_ids"])
        self.labels = list(dataset["labels"])
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [{"input_ids": self.input_ids[k], "labels": self.labels[k]} for k in self.rows[i]]


def make_dataloader(data: TokenizedData, batch_size: int, pad_token_id: int, seed: int, shuffle: bool, num_workers: int = 0,
                    packing: bool = False, group_by_length: bool = False, max_seq_len: int = 0):
    """The DataLoader of one split: ``batch_size`` padded examples per micro-batch (similar lengths
    together with ``group_by_length``), or ``batch_size`` packed rows of up to ``max_seq_len`` tokens."""
    if packing:
        rows = pack_rows(data.lengths, max_seq_len)
        dataset, collate = PackedDataset(data.dataset, rows), PackingCollator(pad_token_id)
        sampler = EpochShuffleSampler(len(rows), seed, shuffle)
    else:
        dataset, collate = data.dataset.with_format(columns=["input_ids", "labels"]), PaddingCollator(pad_token_id)
        sampler = (LengthGroupedSampler(data.lengths, batch_size, seed, shuffle) if group_by_length
                   else EpochShuffleSampler(len(data.dataset), seed, shuffle))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())  # for the accelerator's non-blocking copies


class PackingCollator:
    """Turns a list of packed rows (each a list of examples) into one batch without cross-talk.

    * Attention: ``position_ids`` restart at 0 for every example and no ``attention_mask`` is
      returned, so transformers builds a block-causal mask (see the module docstring).
    * Loss: the first label of every example is set to ``-100``. Labels are unshifted (the label at
      ``t`` is predicted from position ``t - 1``), so otherwise the last token of one example would
      be trained to predict the next example's first token (with ``train_on_prompt``).
    * Padding: rows are padded to the longest row of the batch (rounded up to
      ``pad_to_multiple_of``) with ``pad_token_id``, labels ``-100`` and position ids 0, 1, 2, ...:
      the tail is one more segment that attends only to itself, so no query row is fully masked.

    ``num_tokens`` counts the non-padding tokens.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[list[dict]]) -> dict:
        example_lengths = [len(e["input_ids"]) for row in rows for e in row]
        lengths = [sum(len(e["input_ids"]) for e in row) for row in rows]
        m = self.pad_to_multiple_of
        width = -(-max(lengths) // m) * m if m > 1 else max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for e in row:
                n = len(e["input_ids"])
                input_ids[r, at : at + n] = torch.tensor(e["input_ids"], dtype=torch.long)
                labels[r, at + 1 : at + n] = torch.tensor(e["labels"][1:], dtype=torch.long)  # first stays -100
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
            position_ids[r, at:] = torch.arange(width - at)
        return finish_batch(input_ids, labels, example_lengths, position_ids=position_ids)


def check_packing_support(config, rows_per_batch: int) -> None:
    """Raise ``ValueError`` where transformers would let packed examples attend to each other.

    ``config`` is the model's (``model.config``). Call it once before training with packing. The
    checks mirror transformers 5.x: a KV cache (``use_cache``) disables the packed-row detection,
    and flash-attention only detects packing in a batch of one row.
    """
    if getattr(config, "use_cache", False):
        raise ValueError(
            "packing needs model.config.use_cache = False: with a KV cache transformers ignores the "
            "position ids and attention would cross the packed examples"
        )
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in _MASKED_IMPLEMENTATIONS and not (impl.startswith("flash_attention") and rows_per_batch == 1):
        raise ValueError(
            f"packing with attn_implementation={impl!r} and {rows_per_batch} rows per micro-batch would let examples "
            f"attend to each other (flash attention sees example boundaries only in a batch of one row); set "
            f"micro_batch_size: 1 (and raise max_seq_len or gradient_accumulation_steps), or attn_implementation: sdpa"
        )


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A permutation of the examples in which every consecutive ``batch_size`` chunk has similar lengths.

    Padding to the longest example of a batch wastes less when a batch's examples are alike. The
    order is random but depends only on ``(seed, epoch)``: identical on every rank (accelerate deals
    the prepared DataLoader's batches round-robin to ranks) and in every run (exact resume replays
    it). A ``torch.Generator`` seeded ``seed + epoch`` draws a permutation, which is cut into
    megabatches of ``batch_size * megabatch_mult``; each is sorted by length, longest first, and cut
    into batches; the same generator then shuffles the order of the batches. As in HF's Trainer, the
    batch holding the longest example goes first so an out-of-memory error shows at step 1, not
    hours in. A last, partial batch stays last, so the DataLoader's chunks are exactly these batches
    (should it hold the longest example, that one trades places with the first batch's longest).

    ``shuffle=False`` gives the plain order ``0, 1, 2, ...`` (evaluation).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, megabatch_mult: int = 50):
        if batch_size < 1 or megabatch_mult < 1:
            raise ValueError("batch_size and megabatch_mult must be positive")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle, self.megabatch_mult = batch_size, seed, shuffle, megabatch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        n = len(self.lengths)
        if not self.shuffle or n == 0:
            return iter(range(n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=g).tolist()
        size, b = self.batch_size * self.megabatch_mult, self.batch_size
        batches: list[list[int]] = []
        for start in range(0, n, size):
            mega = sorted(perm[start : start + size], key=lambda k: -self.lengths[k])  # stable: ties keep perm order
            batches.extend(mega[i : i + b] for i in range(0, len(mega), b))
        partial = batches.pop() if len(batches[-1]) < b else []  # stays last: the DataLoader's chunks stay these batches
        order = torch.randperm(len(batches), generator=g).tolist()
        if batches:  # the batch holding the longest example first (each batch is sorted: [0] is its longest)
            first = max(range(len(batches)), key=lambda i: self.lengths[batches[i][0]])
            order.remove(first)
            order.insert(0, first)
            if partial and self.lengths[partial[0]] > self.lengths[batches[first][0]]:  # rare: swap it in
                partial[0], batches[first][0] = batches[first][0], partial[0]
        return iter([k for i in order for k in batches[i]] + partial)
