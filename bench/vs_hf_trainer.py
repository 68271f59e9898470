"""qwenloop vs the Hugging Face Trainer + PEFT on the same LoRA job: throughput, peak memory, loss.

    python bench/vs_hf_trainer.py                                  # 3 rounds, 600 examples, all variants
    python bench/vs_hf_trainer.py --examples 40 --rounds 1 --variants hf ql-base   # a quick smoke run

Workload (built locally, deterministic, cached under --workdir): a random-init Qwen2 with Qwen's real
vocabulary size (151,936 rows, untied head; hidden 256, 4 layers, 4 heads / 2 kv heads) and chat
conversations with long-tailed lengths (lognormal word counts). Both sides train the same job: LoRA r16
alpha32 dropout 0 on all 7 projections, micro-batch 4, no accumulation, fp32, non-reentrant gradient
checkpointing, AdamW lr 2e-4 with cosine decay and equal warmup, grad clip 1.0, one epoch, on the token
ids qwenloop makes (``qwenloop.data.build_dataset``), in qwenloop's example order (EpochShuffleSampler).

Variants: ``hf`` (Trainer, padding collator, full logits) and qwenloop with its speed features switched
on one at a time: ``ql-base`` (none), ``ql-head`` (LM head on target positions only), ``ql-group``
(head + length-grouped batches), ``ql-pack`` (head + packing), ``ql-pack-nohead`` (packing only).

Every (round, variant) runs in a fresh child process; rounds cycle through the variants so machine noise
hits all alike. Per run: training-loop seconds, target / non-pad tokens trained, their rates, the child's
peak RSS, training loss per target token, and the loss per target token of the trained adapter on 50
held-out conversations (same fp32 evaluation for every variant). The summary takes medians over rounds.

Kept equal on purpose: both collators pad right to a multiple of 8 (``pad_to_multiple_of=8`` on the HF
side, as qwenloop's collator does); the first warmup step has lr 0 on both sides. Packing variants
make fewer, fuller steps (one row of up to 2,048 tokens), so their schedule and losses differ by design;
with ``--steps`` they run that many *packed* steps. Needs ~9 GiB of RAM for the hf child.
"""

from __future__ import annotations

import argparse, dataclasses, json, math, os, platform, random, resource, shlex, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MODEL = dict(vocab_size=151936, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
JOB = dict(micro_batch=4, packed_rows=1, lr=2e-4, max_grad_norm=1.0, max_seq_len=2048, warmup_ratio=0.03, pad_multiple=8)
VARIANTS = {  # qwenloop variants: the value of each feature key; `hf` is the Trainer
    "hf": None,
    "ql-base": dict(lm_head_targets_only=False, packing=False, group_by_length=False),
    "ql-head": dict(lm_head_targets_only=True, packing=False, group_by_length=False),
    "ql-group": dict(lm_head_targets_only=True, packing=False, group_by_length=True),
    "ql-pack": dict(lm_head_targets_only=True, packing=True, group_by_length=False),
    "ql-pack-nohead": dict(lm_head_targets_only=False, packing=True, group_by_length=False),
}
CHILD_ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                 TQDM_DISABLE="1", ACCELERATE_MIXED_PRECISION="no", TRANSFORMERS_VERBOSITY="error")


# ---------------------------------------------------------------------------------------------- workload
def make_conversations(n: int, seed: int, prompt_words=13, answer_words=47, answer_cap=650) -> list[dict]:
    """Chat records in qwenloop's `messages` format; words from a fixed list, lognormal turn lengths
    (user median 13 words, assistant 47, sigma 1.0): ~230 tokens on average, a tail past 1,000."""
    from qwenloop.tiny import ANIMAL_SOUNDS, CAPITALS, SYSTEM_PROMPTS, WORDS

    vocab = list(WORDS) + [w for pair in CAPITALS + ANIMAL_SOUNDS for w in pair] + (
        "the a of and to in is that it for on with as was at by this be from or are an answer question number step").split()
    rng = random.Random(seed)

    def text(median: float, cap: int) -> str:
        words = []
        for _ in range(min(cap, max(1, round(rng.lognormvariate(math.log(median), 1.0))))):
            words.append(rng.choice(vocab) + (rng.choice(".,?!") if rng.random() < 0.08 else ""))
            if rng.random() < 0.03:
                words.append(str(rng.randint(0, 999)))
        return " ".join(words)

    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        for _ in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
            messages += [{"role": "user", "content": text(prompt_words, 400)}, {"role": "assistant", "content": text(answer_words, answer_cap)}]
        records.append({"messages": messages})
    return records


def workload_paths(a) -> dict[str, Path]:
    work = Path(a.workdir).absolute()
    name = "model-v{vocab_size}-h{hidden_size}-i{intermediate_size}-l{num_layers}-a{num_heads}-kv{num_kv_heads}".format(**MODEL)
    data = work / f"data-n{a.examples}-h{a.heldout}-s{a.seed}"
    return dict(work=work, model=work / name, train=data / "train.jsonl", heldout=data / "heldout.jsonl",
                cache=work / "datasets-cache", runs=work / "runs")


def prepare_workload(p: dict[str, Path], a) -> None:
    """Build the model and write the data files (only when missing or different: keeps the
    datasets tokenization cache valid)."""
    from qwenloop.tiny import ensure_tiny_model

    ensure_tiny_model(p["model"], **MODEL)
    records = make_conversations(a.examples + a.heldout, a.seed)
    for path, part in ((p["train"], records[: a.examples]), (p["heldout"], records[a.examples:])):
        text = "".join(json.dumps(r) + "\n" for r in part)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def tokenized(p: dict[str, Path]):
    """(tokenizer, train dataset, held-out dataset), tokenized by qwenloop itself."""
    import qwenloop
    from qwenloop.data import build_dataset
    from qwenloop.model import load_tokenizer

    cfg = qwenloop.TrainConfig.from_dict({"model": str(p["model"]), "train_file": str(p["train"]), "max_seq_len": JOB["max_seq_len"]})
    tok = load_tokenizer(cfg)
    return tok, build_dataset(str(p["train"]), tok, cfg).dataset, build_dataset(str(p["heldout"]), tok, cfg).dataset


def length_stats(ds) -> dict:
    lengths, targets = sorted(len(x) for x in ds["input_ids"]), list(ds["num_targets"])
    q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]  # noqa: E731
    return dict(examples=len(lengths), mean=statistics.mean(lengths), p50=q(0.5), p90=q(0.9), p99=q(0.99),
                max=lengths[-1], tokens=sum(lengths), target_tokens=sum(targets), mean_targets=statistics.mean(targets))


def schedule(a, n: int) -> tuple[int, int]:
    """(optimizer steps, warmup steps) of the unpacked job: one epoch of ceil(n / micro) batches, or --steps."""
    epoch = -(-n // JOB["micro_batch"])
    if a.steps > epoch:
        sys.exit(f"--steps {a.steps} is more than one epoch ({epoch} steps of {JOB['micro_batch']} examples)")
    steps = a.steps or epoch
    return steps, math.ceil(JOB["warmup_ratio"] * steps)


def batches_trained(ds, seed: int, steps: int) -> dict:
    """Target tokens, non-pad tokens and padded positions of the first `steps` micro-batches in
    qwenloop's order (EpochShuffleSampler, epoch 0), padded like both collators (to a multiple of 8)."""
    from qwenloop.data import EpochShuffleSampler

    order, m, b = list(EpochShuffleSampler(len(ds), seed, shuffle=True)), JOB["pad_multiple"], JOB["micro_batch"]
    lengths, targets = [len(x) for x in ds["input_ids"]], ds["num_targets"]
    out = dict(target_tokens=0, tokens=0, positions=0, step_targets=[])
    for s in range(steps):
        idx = order[s * b:(s + 1) * b]
        out["step_targets"].append(sum(targets[i] for i in idx))
        out["target_tokens"] += out["step_targets"][-1]
        out["tokens"] += sum(lengths[i] for i in idx)
        out["positions"] += len(idx) * -(-max(lengths[i] for i in idx) // m) * m
    return out


def per_target_token(step_losses: list[float], step_targets: list[int] | None) -> float:
    """Mean of per-step losses (each a mean over the step's targets) weighted by the step's targets:
    the training loss per target token over the run. Unweighted when the step sizes are unknown."""
    if not step_targets or len(step_targets) != len(step_losses):
        return statistics.mean(step_losses)
    return sum(l * t for l, t in zip(step_losses, step_targets)) / sum(step_targets)


@dataclasses.dataclass
class Ledger:
    """One child's numbers."""
    seconds: float
    target_tokens: int
    tokens: int
    steps: int
    train_loss: float
    padding_fraction: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- children
def train_hf(a, p, tok, ds) -> tuple[Ledger, Path]:
    import torch, transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from qwenloop.data import EpochShuffleSampler

    _, warmup = schedule(a, len(ds))  # also refuses --steps beyond one epoch
    transformers.set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))

    class QwenloopOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return EpochShuffleSampler(len(self.train_dataset if train_dataset is None else train_dataset), a.seed, shuffle=True)

    class LoopClock(TrainerCallback):
        start = seconds = steps = 0

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps += 1

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

    out = p["runs"] / f"hf-r{a.round}"
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=JOB["micro_batch"], gradient_accumulation_steps=1,
        learning_rate=JOB["lr"], lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=JOB["max_grad_norm"], num_train_epochs=1, max_steps=a.steps or -1, seed=a.seed,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True,
        report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False)
    clock = LoopClock()
    trainer = QwenloopOrderTrainer(
        model=model, args=args, train_dataset=ds.select_columns(["input_ids", "labels"]), callbacks=[clock],
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=JOB["pad_multiple"], label_pad_token_id=-100))
    trainer.train()
    counts = batches_trained(ds, a.seed, clock.steps)  # the examples of the steps done, not what was prefetched
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ledger = Ledger(clock.seconds, counts["target_tokens"], counts["tokens"], clock.steps,
                    per_target_token(losses, counts["step_targets"]),
                    1 - counts["tokens"] / counts["positions"])
    trainer.model.save_pretrained(out / "adapter")  # after the clock stopped
    return ledger, out / "adapter"


def train_qwenloop(a, p, tok, ds) -> tuple[Ledger, Path]:
    import qwenloop

    _, warmup = schedule(a, len(ds))  # also refuses --steps beyond one epoch
    features = resolve_features(a.variant)
    out = p["runs"] / f"{a.variant}-r{a.round}"
    cfg = qwenloop.TrainConfig.from_dict({
        "model": str(p["model"]), "train_file": str(p["train"]), "output_dir": str(out), "overwrite_output_dir": True,
        "attn_implementation": "sdpa", "gradient_checkpointing": True, "gradient_checkpointing_reentrant": False,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "max_seq_len": JOB["max_seq_len"], "gradient_accumulation_steps": 1,
        # Packed: one row of up to 2,048 tokens per step (~2x a padded batch's ~950 tokens, and fewer
        # positions than a padded batch of the long tail, 4 x 1,309); padded: 4 examples.
        "micro_batch_size": JOB["packed_rows"] if features.get("packing") else JOB["micro_batch"],
        "learning_rate": JOB["lr"], "weight_decay": 0.0, "lr_scheduler": "cosine", "max_grad_norm": JOB["max_grad_norm"],
        # Packing changes the number of steps: warm up for the same fraction of them instead.
        "warmup_steps": 0 if features.get("packing") else warmup, "warmup_ratio": JOB["warmup_ratio"],
        "num_epochs": 1, "max_steps": a.steps, "seed": a.seed, "log_every_steps": 1, **features})
    qwenloop.train(cfg)
    run = json.loads((out / "run.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_logged = [m for m in metrics if "loss" in m]
    last = steps_logged[-1]
    ordered = not features.get("packing") and not features.get("group_by_length")  # batches as batches_trained makes them
    counts = batches_trained(ds, a.seed, run["steps"]) if ordered else {}
    seconds = run.get("train_seconds") or last["tokens"] / last["tokens_per_s"]
    targets = run.get("target_tokens_seen") or counts.get("target_tokens")
    if targets is None:
        raise RuntimeError(f"{a.variant}: run.json has no target_tokens_seen and the batches are not in plain order")
    padding = run.get("padding_fraction")
    if padding is None and counts:
        padding = 1 - counts["tokens"] / counts["positions"]
    if "target_tokens" in last:  # cumulative per logged step
        seen = [m["target_tokens"] for m in steps_logged]
        step_targets = [now - before for before, now in zip([0] + seen[:-1], seen)]
    else:
        step_targets = counts.get("step_targets")
    extra = {k: run[k] for k in ("peak_memory", "peak_memory_per_rank", "model_flops") if k in run}
    ledger = Ledger(seconds, int(targets), int(run.get("tokens_seen") or last["tokens"]), run["steps"],
                    per_target_token([m["loss"] for m in steps_logged], step_targets), padding, extra)
    return ledger, out / "adapter"


def heldout_loss(model_dir: Path, adapter_dir: Path | None, ds) -> float:
    """Loss per target token of base (+ adapter) on `ds`: one example at a time (no padding), plain
    `model(...).logits`, fp32 cross-entropy summed over targets / number of targets."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(ds["input_ids"], ds["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").double().item()
            count += int((target != -100).sum())
    return total / count


def resolve_features(variant: str) -> dict:
    """The variant's feature keys that this qwenloop knows; a feature it lacks is off, and a variant
    needing one it lacks cannot run."""
    import qwenloop

    known = {f.name for f in dataclasses.fields(qwenloop.TrainConfig)}
    wanted = VARIANTS[variant]
    missing = [k for k, on in wanted.items() if on and k not in known]
    if missing:
        raise SystemExit(f"variant {variant} needs qwenloop config key(s) {missing}, which this checkout lacks")
    return {k: v for k, v in wanted.items() if k in known}


def child(a) -> None:
    p = workload_paths(a)
    tok, ds, held = tokenized(p)
    ledger, adapter = (train_hf if a.variant == "hf" else train_qwenloop)(a, p, tok, ds)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, before the eval
    result = dict(variant=a.variant, round=a.round, **dataclasses.asdict(ledger), peak_rss_gib=peak_rss,
                  heldout_loss=heldout_loss(p["model"], adapter, held))
    result["target_tokens_per_s"] = ledger.target_tokens / ledger.seconds
    result["tokens_per_s"] = ledger.tokens / ledger.seconds
    Path(a.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- parent
def run_child(a, variant: str, rnd: int, p: dict[str, Path]) -> dict | None:
    result, log = p["work"] / "results" / f"r{rnd}-{variant}.json", p["work"] / "logs" / f"r{rnd}-{variant}.log"
    for path in (result, log):
        path.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, *a.argv, "--child", variant, "--round", str(rnd), "--result", str(result)]
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV}).returncode
    if rc != 0 or not result.exists():
        print(f"  round {rnd} {variant}: FAILED (rc={rc}), log {log}:\n" + "".join(open(log).readlines()[-15:]))
        return None
    r = json.loads(result.read_text())
    print(f"  round {rnd} {variant}: {r['seconds']:.1f} s loop ({time.perf_counter() - start:.0f} s child), "
          f"{r['target_tokens_per_s']:.0f} target tok/s, {r['peak_rss_gib']:.2f} GiB, held-out {r['heldout_loss']:.4f}")
    return r


def machine() -> dict:
    import peft, torch, transformers, accelerate

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return dict(nproc=len(os.sched_getaffinity(0)), cpu=cpu, torch_threads=torch.get_num_threads(), python=platform.python_version(),
                torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__, accelerate=accelerate.__version__)


def report(a, runs: list[dict], stats: dict, untrained: float, info: dict) -> str:
    med = lambda v, k: statistics.median(r[k] for r in runs if r["variant"] == v)  # noqa: E731
    done = [v for v in a.variants if any(r["variant"] == v for r in runs)]
    base = "hf" if "hf" in done else None
    lines = ["# qwenloop vs HF Trainer + PEFT", "", f"Command: `{a.command}`", "",
             f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch threads {info['torch_threads']}; python {info['python']}, "
             f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, accelerate {info['accelerate']}", "",
             f"Model: random Qwen2 {MODEL}, untied LM head. Job: LoRA r16/a32/dropout 0 on {len(TARGETS)} projections, micro-batch "
             f"{JOB['micro_batch']}, fp32, non-reentrant gradient checkpointing, AdamW {JOB['lr']}, cosine, clip 1.0, seed {a.seed}.", "",
             f"Workload: {stats['train']['examples']} train conversations, tokens per example mean {stats['train']['mean']:.0f} / "
             f"p50 {stats['train']['p50']} / p90 {stats['train']['p90']} / p99 {stats['train']['p99']} / max {stats['train']['max']}; "
             f"{stats['train']['tokens']} tokens, {stats['train']['target_tokens']} target tokens "
             f"(mean {stats['train']['mean_targets']:.0f} per example). Held-out: {stats['heldout']['examples']} conversations "
             f"(mean {stats['heldout']['mean']:.0f} tokens); their loss per target token before training: {untrained:.4f}.", "",
             f"Medians over {a.rounds} round(s):", "",
             "| variant | runs | steps | loop s | target tok/s | all tok/s | speed x | peak RSS GiB | memory x | padding | train loss | held-out loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in done:
        n = sum(r["variant"] == v for r in runs)
        speed = f"{med(v, 'target_tokens_per_s') / med(base, 'target_tokens_per_s'):.2f}" if base else "-"
        mem = f"{med(v, 'peak_rss_gib') / med(base, 'peak_rss_gib'):.2f}" if base else "-"
        pads = [r["padding_fraction"] for r in runs if r["variant"] == v and r["padding_fraction"] is not None]
        pad = f"{100 * statistics.median(pads):.0f}%" if pads else "?"
        lines.append(f"| {v} | {n} | {med(v, 'steps'):.0f} | {med(v, 'seconds'):.1f} | {med(v, 'target_tokens_per_s'):.0f} | "
                     f"{med(v, 'tokens_per_s'):.0f} | {speed} | {med(v, 'peak_rss_gib'):.2f} | {mem} | {pad} | "
                     f"{med(v, 'train_loss'):.4f} | {med(v, 'heldout_loss'):.4f} |")
    lines += ["", "Per run:", "", "| round | variant | steps | loop s | target tokens | all tokens | target tok/s | all tok/s | "
              "peak RSS GiB | train loss | held-out loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['round']} | {r['variant']} | {r['steps']} | {r['seconds']:.2f} | {r['target_tokens']} | {r['tokens']} | "
                     f"{r['target_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} | {r['train_loss']:.4f} | "
                     f"{r['heldout_loss']:.4f} |")
    lines += ["", "Columns: *loop s* training-loop wall time (HF: on_train_begin..on_train_end; qwenloop: run.json "
              "train_seconds, else metrics.jsonl tokens / tokens_per_s at the last step); *target tok/s* assistant tokens "
              "trained on / loop s; *all tok/s* non-pad tokens / loop s; *speed x*, *memory x* median target tok/s and peak "
              "RSS relative to hf; *peak RSS* the child's ru_maxrss after training (model load included, eval excluded); "
              "*padding* pad share of the positions computed; *train loss* the per-step training losses averaged per target token; *held-out loss* "
              "the trained adapter's fp32 loss per target token on the held-out conversations, evaluated identically for all."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples", type=int, default=600, help="training conversations")
    ap.add_argument("--heldout", type=int, default=50, help="held-out conversations for the loss check")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (default: one epoch)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default=str(ROOT / "outputs" / "bench-vs-hf"), help="model, data, caches, run dirs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"vs_hf_trainer-{time.strftime('%Y-%m-%d')}.md"))
    ap.add_argument("--json", default=None, help="raw results as JSON (default: --out with .json)")
    ap.add_argument("--child", dest="variant", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    p = workload_paths(a)
    os.environ.update(CHILD_ENV, HF_DATASETS_CACHE=str(p["cache"]))  # before datasets is imported
    if a.variant:
        return child(a)
    for v in a.variants:  # fail now, not after an hour of the other variants
        if v != "hf":
            resolve_features(v)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.command = "python " + shlex.join([os.path.relpath(__file__), *a.argv])
    prepare_workload(p, a)
    tok, ds, held = tokenized(p)
    schedule(a, len(ds))  # a bad --steps fails here, not in every child
    stats = dict(train=length_stats(ds), heldout=length_stats(held))
    t = stats["train"]
    print(f"workload: {t['examples']} examples, tokens mean {t['mean']:.0f} p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} "
          f"max {t['max']}, {t['target_tokens']} target tokens; held-out {stats['heldout']['examples']} examples")
    untrained = heldout_loss(p["model"], None, held)
    runs = [r for rnd in range(1, a.rounds + 1) for v in a.variants if (r := run_child(a, v, rnd, p))]
    text = report(a, runs, stats, untrained, info := machine())
    print("\n" + text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    Path(a.json or Path(a.out).with_suffix(".json")).write_text(json.dumps(
        dict(command=a.command, machine=info, model=MODEL, job=JOB, workload=stats, untrained_heldout_loss=untrained, runs=runs), indent=1))
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
