"""Sequence packing (best-fit rows, no cross-talk through attention or loss) and length-grouped batching.

The isolation tests run the tiny Qwen2 model on a packed row and compare each example's loss with
the loss of the example run alone; negative controls show the comparison would catch a regression
(an attention mask, missing position ids, or a KV cache all let attention cross examples).
"""

import math
import random
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from qwenloop.data import IGNORE_INDEX, MODEL_INPUTS, EpochShuffleSampler, build_dataset, finish_batch, tokenize_conversation
from qwenloop.batching import LengthGroupedSampler, PackedDataset, PackingCollator, check_packing_support, pack_rows
from qwenloop.tiny import demo_conversations

# --------------------------------------------------------------------------------------------
# pack_rows
# --------------------------------------------------------------------------------------------


def lognormal_lengths(n, max_len, seed):
    rng = random.Random(seed)
    return [min(max_len, max(1, int(rng.lognormvariate(math.log(max_len / 6), 0.9)))) for _ in range(n)]


def test_pack_rows_places_every_index_once_and_respects_max_len():
    lengths = lognormal_lengths(2000, 512, seed=0)
    rows = pack_rows(lengths, 512)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert all(row == sorted(row) for row in rows)


def test_pack_rows_is_nearly_optimal_on_long_tailed_lengths():
    lengths = lognormal_lengths(2000, 512, seed=1)
    assert max(lengths) == 512 and min(lengths) < 20  # really long-tailed: some full rows, many short ones
    lower_bound = math.ceil(sum(lengths) / 512)
    rows = pack_rows(lengths, 512)
    assert len(rows) <= lower_bound * 1.03
    # Much better than one example per row (what packing saves).
    assert len(rows) < len(lengths) / 3


def naive_best_fit_decreasing(lengths, max_len):
    """Reference: scan every open row for the tightest fit (ties: the row opened first)."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
        else:
            r = len(rows)
            rows.append([])
            free.append(max_len)
        rows[r].append(i)
        free[r] -= lengths[i]
    return [sorted(row) for row in rows]


def test_pack_rows_is_deterministic_best_fit_decreasing():
    lengths = lognormal_lengths(500, 256, seed=2)
    rows = pack_rows(lengths, 256)
    assert rows == pack_rows(list(lengths), 256)
    assert rows == naive_best_fit_decreasing(lengths, 256)
    small = [random.Random(seed).randint(1, 10) for seed in range(40)]
    assert pack_rows(small, 10) == naive_best_fit_decreasing(small, 10)
    assert pack_rows([10, 10], 10) == [[0], [1]]
    assert pack_rows([], 10) == []


def test_pack_rows_rejects_over_long_and_empty_examples():
    with pytest.raises(ValueError, match="example 1 has 11 tokens"):
        pack_rows([3, 11, 2], 10)
    with pytest.raises(ValueError, match="empty"):
        pack_rows([3, 0], 10)


def test_pack_rows_scales_to_many_examples():
    lengths = lognormal_lengths(200_000, 2048, seed=3)
    start = time.perf_counter()
    rows = pack_rows(lengths, 2048)
    assert time.perf_counter() - start < 10  # a scan over all open rows per example would take minutes
    assert sum(len(r) for r in rows) == len(lengths)


# --------------------------------------------------------------------------------------------
# isolation on the tiny model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=request.param, dtype=torch.float32)
    m.config.use_cache = False  # as qwenloop.model does for training; with a cache packing is ignored (tested below)
    assert m.config._attn_implementation == request.param
    return m.eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Four demo conversations, everything a target (train_on_prompt): the case where an
    unmasked first label would train one example to predict the next one's first token."""
    out = []
    for conv in demo_conversations(4, seed=11):
        ids, labels = tokenize_conversation(tokenizer, conv["messages"], train_on_prompt=True)
        out.append({"input_ids": ids, "labels": labels})
    assert len({len(e["input_ids"]) for e in out}) > 1
    return out


def segments(batch, row=0):
    """(start, end) of each segment of a row, found from where position_ids restart (independently of
    transformers' own detection)."""
    pos = batch["position_ids"][row].tolist()
    starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
    return list(zip(starts[:-1], starts[1:]))


def target_losses(logits, batch):
    """Per-target token loss, from the batch's target_index/target_labels."""
    flat = logits.reshape(-1, logits.shape[-1])[batch["target_index"]]
    return F.cross_entropy(flat.float(), batch["target_labels"], reduction="none")


def model_inputs(batch):
    """What the training loop feeds the model from a batch."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def packed_example_losses(model, batch, **forward_kwargs):
    """Summed token loss of each example of row 0, from one forward over the packed batch."""
    with torch.no_grad():
        logits = model(**forward_kwargs).logits
    losses = target_losses(logits, batch)
    width = batch["input_ids"].shape[1]
    where = batch["target_index"] % width
    return [losses[(where >= s) & (where < e) & (batch["target_index"] < width)].sum().item() for s, e in segments(batch)]


def alone_loss(model, example):
    """Summed token loss of one example run by itself: one row, no padding, no mask, default positions."""
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    keep = labels[1:] != IGNORE_INDEX
    return F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum").item()


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_packed_loss_equals_each_example_alone(model, examples):
    batch = PackingCollator(pad_token_id=0, pad_to_multiple_of=64)([examples])
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape[1] > sum(len(e["input_ids"]) for e in examples)  # there is a padding tail
    packed = packed_example_losses(model, batch, **model_inputs(batch))
    assert len(packed) == len(examples) + 1 and packed[-1] == 0  # the padding tail has no target
    for k, e in enumerate(examples):
        assert rel(packed[k], alone_loss(model, e)) < 1e-5, k


def test_changing_one_example_changes_only_its_own_loss(model, examples):
    collate = PackingCollator(pad_token_id=0)
    before = collate([examples])
    changed = [dict(e) for e in examples]
    ids = [(t * 7 + 3) % 400 for t in examples[1]["input_ids"]]  # same length, other tokens
    changed[1] = {"input_ids": ids, "labels": list(ids)}
    after = collate([changed])
    assert torch.equal(before["position_ids"], after["position_ids"])
    a = packed_example_losses(model, before, **model_inputs(before))
    b = packed_example_losses(model, after, **model_inputs(after))
    assert rel(a[1], b[1]) > 1e-2
    for k in (0, 2, 3):
        assert rel(b[k], a[k]) < 1e-6, k


@pytest.mark.parametrize(
    "breakage",
    ["all-ones attention_mask", "no position_ids", "KV cache (use_cache=True)"],
)
def test_negative_controls_let_attention_cross_examples(model, examples, breakage):
    """Each of these is a way isolation gets lost; the comparison above must notice it."""
    batch = PackingCollator(pad_token_id=0)([examples])
    kwargs = model_inputs(batch)
    if breakage == "all-ones attention_mask":
        kwargs["attention_mask"] = torch.ones_like(batch["input_ids"])
    elif breakage == "no position_ids":
        del kwargs["position_ids"]
    else:
        kwargs["use_cache"] = True
    packed = packed_example_losses(model, batch, **kwargs)
    alone = [alone_loss(model, e) for e in examples]
    assert rel(packed[0], alone[0]) < 1e-5  # the first example sees nothing before it either way
    assert max(rel(packed[k], alone[k]) for k in range(1, len(examples))) > 1e-3


# --------------------------------------------------------------------------------------------
# the batch itself: targets, positions, padding
# --------------------------------------------------------------------------------------------


def test_packed_targets_are_exactly_the_examples_alone_targets(examples):
    rows = [examples[:3], examples[3:]]
    batch = PackingCollator(pad_token_id=0)(rows)
    width = batch["input_ids"].shape[1]
    index, labels = batch["target_index"].tolist(), batch["target_labels"].tolist()
    expected_total = 0
    for r, row in enumerate(rows):
        for (s, e), ex in zip(segments(batch, r), row):
            alone = finish_batch(torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]]), [len(ex["input_ids"])])
            mine = [(i - r * width - s, lab) for i, lab in zip(index, labels) if s <= i - r * width < e]
            assert mine == list(zip(alone["target_index"].tolist(), alone["target_labels"].tolist()))
            expected_total += alone["num_targets"]
            assert alone["num_targets"] == sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX)
    assert batch["num_targets"] == expected_total == len(index)
    # No target crosses a boundary: a target position's next token is in the same segment.
    for i in index:
        r, t = divmod(i, width)
        assert any(s <= t and t + 1 < e for s, e in segments(batch, r))


def test_collator_layout(examples):
    rows = [examples[:1], examples[1:]]
    batch = PackingCollator(pad_token_id=5, pad_to_multiple_of=8)(rows)
    lengths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and max(lengths) <= width < max(lengths) + 8
    assert batch["num_tokens"] == sum(lengths)
    assert set(batch) >= {"input_ids", "labels", "position_ids", "target_index", "target_labels"}
    assert "attention_mask" not in batch
    for r, row in enumerate(rows):
        ids, labs, pos = (batch[k][r].tolist() for k in ("input_ids", "labels", "position_ids"))
        at = 0
        for e in row:
            n = len(e["input_ids"])
            assert ids[at : at + n] == e["input_ids"]
            assert pos[at : at + n] == list(range(n))
            assert labs[at] == IGNORE_INDEX and labs[at + 1 : at + n] == e["labels"][1:]
            at += n
        assert ids[at:] == [5] * (width - at)
        assert labs[at:] == [IGNORE_INDEX] * (width - at)
        assert pos[at:] == list(range(width - at))


def test_packed_dataloader_covers_every_target_once(tokenizer, tmp_path):
    """PackedDataset + EpochShuffleSampler + PackingCollator over a real tokenized dataset: one epoch
    holds every example's tokens exactly once and the dataset's target count."""
    path = write_jsonl(tmp_path / "d.jsonl", demo_conversations(40, seed=5))
    cfg = SimpleNamespace(format="auto", max_seq_len=128, truncation="truncate", train_on_prompt=False)
    data = build_dataset(str(path), tokenizer, cfg)
    lengths = [len(x) for x in data.dataset["input_ids"]]
    packed = PackedDataset(data.dataset, pack_rows(lengths, 256))
    assert len(packed) < len(lengths)
    assert packed[0] == [{"input_ids": data.dataset[k]["input_ids"], "labels": data.dataset[k]["labels"]} for k in packed.rows[0]]
    sampler = EpochShuffleSampler(len(packed), seed=3)
    loader = torch.utils.data.DataLoader(packed, batch_size=2, sampler=sampler, collate_fn=PackingCollator(tokenizer.pad_token_id))
    batches = list(loader)
    assert sum(b["num_targets"] for b in batches) == data.target_tokens
    assert sum(b["num_tokens"] for b in batches) == sum(lengths)
    row_order = list(sampler)
    seen = []
    for j, b in enumerate(batches):
        for r, row in enumerate(row_order[2 * j : 2 * j + 2]):
            examples = segments(b, r)[: len(packed.rows[row])]  # any further segment is the padding tail
            seen += [tuple(b["input_ids"][r, s:e].tolist()) for s, e in examples]
    assert sorted(seen) == sorted(tuple(x) for x in data.dataset["input_ids"])


# --------------------------------------------------------------------------------------------
# guard
# --------------------------------------------------------------------------------------------


def test_check_packing_support():
    ok = SimpleNamespace(use_cache=False, _attn_implementation="sdpa")
    check_packing_support(ok, rows_per_batch=4)
    check_packing_support(SimpleNamespace(use_cache=False, _attn_implementation="flash_attention_2"), rows_per_batch=1)
    with pytest.raises(ValueError, match="use_cache"):
        check_packing_support(SimpleNamespace(use_cache=True, _attn_implementation="sdpa"), rows_per_batch=1)
    with pytest.raises(ValueError, match="flash_attention_2"):
        check_packing_support(SimpleNamespace(use_cache=False, _attn_implementation="flash_attention_2"), rows_per_batch=2)


# --------------------------------------------------------------------------------------------
# LengthGroupedSampler
# --------------------------------------------------------------------------------------------


def order(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def mean_spread(lengths, idx, batch_size):
    chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return sum(max(lengths[k] for k in c) - min(lengths[k] for k in c) for c in chunks) / len(chunks)


@pytest.mark.parametrize("n", [1000, 1003])
def test_length_grouped_sampler(n):
    lengths = lognormal_lengths(n, 512, seed=4)
    s = LengthGroupedSampler(lengths, batch_size=8, seed=9, megabatch_mult=10)
    e0, e1 = order(s, 0), order(s, 1)
    assert len(s) == n
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert e0 == order(LengthGroupedSampler(lengths, batch_size=8, seed=9, megabatch_mult=10), 0)  # a fresh one, same order
    assert e0 == order(s, 0)
    assert e0 != e1
    assert e0 != order(LengthGroupedSampler(lengths, batch_size=8, seed=10, megabatch_mult=10), 0)
    # Batches are alike in length: far less spread than batches of a random permutation.
    random_order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    assert mean_spread(lengths, e0, 8) < 0.25 * mean_spread(lengths, random_order, 8)
    # Every DataLoader chunk is one sorted batch (a partial batch stays last, not mid-stream).
    for c in (e0[i : i + 8] for i in range(0, n, 8)):
        assert [lengths[k] for k in c] == sorted((lengths[k] for k in c), reverse=True)
    # The longest example is in the first batch (an OOM shows at step 1).
    assert max(lengths) in [lengths[k] for k in e0[:8]]


def test_length_grouped_sampler_longest_in_first_batch_even_from_partial_batch():
    # 3 examples, batch 2: the last megabatch is a lone partial batch; here it holds the longest.
    lengths = [5, 6, 100]
    for seed in range(20):
        e = list(LengthGroupedSampler(lengths, batch_size=2, seed=seed, megabatch_mult=1))
        assert sorted(e) == [0, 1, 2]
        assert 2 in e[:2]


def test_length_grouped_sampler_without_shuffle_is_plain_order():
    s = LengthGroupedSampler([3, 1, 2], batch_size=2, seed=0, shuffle=False)
    s.set_epoch(5)
    assert list(s) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# end to end: training with packing / length grouping
# --------------------------------------------------------------------------------------------


def test_training_with_packing_and_grouping(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    """Packed and length-grouped runs train, waste less on padding than plain padded batches, and a
    packed evaluation gives the same eval loss as a padded one on the same model."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from conftest import base_config, read_metrics, train_in_process
    from qwenloop import TrainConfig
    from qwenloop.batching import make_dataloader
    from qwenloop.loss import find_target_loss_head
    from qwenloop.train import evaluate

    common = dict(max_steps=6, learning_rate=5e-3, lr_scheduler="constant", eval_file=train_jsonl)
    runs = {name: train_in_process(base_config(tiny_model, train_jsonl, tmp_path / name, **common, **extra))
            for name, extra in [("plain", {}), ("grouped", {"group_by_length": True}), ("packed", {"packing": True})]}
    padding = {name: [m["padding_fraction"] for m in read_metrics(r.output_dir) if "loss" in m] for name, r in runs.items()}
    mean = {name: sum(p) / len(p) for name, p in padding.items()}
    assert mean["packed"] < 0.25 * mean["plain"] and mean["grouped"] < 0.5 * mean["plain"], mean
    assert runs["packed"].losses[-1] < runs["packed"].losses[0]

    packed = runs["packed"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = TrainConfig.from_dict(base_config(tiny_model, train_jsonl, tmp_path / "unused"))
    eval_data = build_dataset(train_jsonl, tokenizer, cfg)
    padded_loader = make_dataloader(eval_data, 4, tokenizer.pad_token_id, seed=0, shuffle=False)
    padded_eval = evaluate(packed.model, padded_loader, Accelerator(cpu=True), find_target_loss_head(packed.model))
    assert padded_eval["eval_loss"] == pytest.approx(packed.eval_loss, rel=1e-5)
