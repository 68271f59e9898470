"""The GPU half of bench/vs_hf_trainer.py: qwenloop vs the HF Trainer + PEFT on real Qwen2.5 shapes.

    python3 bench/gpu_bench.py --shape qwen2.5-1.5b --precision bf16 --out r.md     # hf, ql-head, ql-pack
    python3 bench/gpu_bench.py --shape qwen2.5-1.5b --precision fp16 --out r.md     # V100's precision and sdpa kernels
    python3 bench/gpu_bench.py --shape qwen2.5-7b --precision bf16 --variants ql-pack ql-pack-nockpt ql-head --steps 12
    python3 bench/gpu_bench.py --isolation        # packed row vs alone under flex_attention / flash_attention_2
    python3 bench/gpu_bench.py --shape tiny --device cpu --steps 2 --examples 40 --micro-batch 2 --rows 1   # CPU smoke
    python3 bench/gpu_bench.py ... --dry-run      # configs and child command lines, no model, no training

bench/gpu_check.sh runs the lines above (section "issue 8") under `timeout`, a report per run in its OUT dir.

Model: a random-init Qwen2ForCausalLM with the public config.json shape of Qwen2.5-1.5B (hidden 1536, 28
layers, 12/2 heads, vocab 151936, tied head) or Qwen2.5-7B (hidden 3584, 28 layers, 28/4 heads, vocab
152064, untied), created directly on the GPU in the run's dtype and saved (safetensors) under --workdir,
reused when present; the tokenizer is qwenloop.tiny's small BPE (~890 tokens, Qwen's special tokens).
Data: the CPU bench's long-tailed chat conversations (`make_conversations`, ~230 tokens on average).

Job, both sides alike: LoRA r16/a32/dropout 0 on all 7 projections, base weights in bf16 (or fp16) with
autocast, fp32 LoRA weights, non-reentrant gradient checkpointing, sdpa, max_seq_len 2048, fused AdamW
2e-4 cosine, clip 1.0, `--steps` optimizer steps, examples in qwenloop's order (EpochShuffleSampler).
fp16 runs restrict sdpa to the kernels a V100 has (memory-efficient and math; no flash, no cuDNN).
Variants: `hf` (Trainer, padded micro-batches of --micro-batch, full logits), `ql-head` (qwenloop,
same batches, LM head on target positions only), `ql-pack` (head + --rows packed rows of 2,048 tokens),
`ql-pack-nockpt` (ql-pack without gradient checkpointing, for the MFU), and the CPU bench's others.

Each variant runs in its own child process. Per run: target and all (non-pad) tokens per second and the
model TFLOP/s over the steps after the first --skip (steady state), timed alike on both sides as the wall
time from one step's end to the next (HF: on_step_end after a device sync; qwenloop: StepMeter.end_step,
right after the loop's per-step read-back), MFU = model FLOPs of
`qwenloop.flops.step_flops` (HF: computed from the batches it trained, same formula) / time / the GPU's
peak, torch.cuda.max_memory_allocated / reserved (qwenloop: run.json peak_memory_per_rank), and the
training loss per target token. The report is rewritten after every child, so a timeout keeps the rows
done.
"""

from __future__ import annotations

import argparse, json, math, os, resource, shlex, shutil, signal, statistics, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_hf_trainer as cpu  # noqa: E402  (also puts the repository root on sys.path)

SHAPES = {  # Qwen2Config keys; the two real ones from the public config.json files
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_window_layers=21),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_window_layers=28),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False, max_window_layers=2),
}
COMMON = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=None,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, architectures=["Qwen2ForCausalLM"])
PRECISION = {"bf16": ("bfloat16", "bf16"), "fp16": ("float16", "fp16"), "fp32": ("float32", "no")}  # torch dtype, accelerate
VARIANTS = {**cpu.VARIANTS, "ql-pack-nockpt": cpu.VARIANTS["ql-pack"]}
NO_CHECKPOINTING = {"ql-pack-nockpt"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GIB = 1024**3
LR, CLIP, WARMUP_RATIO = cpu.JOB["lr"], cpu.JOB["max_grad_norm"], cpu.JOB["warmup_ratio"]


def paths(a) -> dict[str, Path]:
    work = Path(a.workdir).absolute()
    return dict(work=work, tiny=work / "tiny-v1024", model=work / f"model-{a.shape}-{a.precision}",
                train=work / f"data-n{a.examples}-s{a.seed}" / "train.jsonl", cache=work / "datasets-cache",
                runs=work / "runs" / f"{a.shape}-{a.precision}", logs=Path(a.logs or work / "logs").absolute())


def tiny_dir(p) -> Path:
    """qwenloop's tiny model (tokenizer source, and the isolation check's model)."""
    from qwenloop.tiny import ensure_tiny_model

    return ensure_tiny_model(p["tiny"], vocab_size=1024)


def model_config(a, p):
    from transformers import Qwen2Config

    ids = json.loads((tiny_dir(p) / "config.json").read_text())
    return Qwen2Config(**SHAPES[a.shape], **COMMON, dtype=PRECISION[a.precision][0], use_cache=True,
                       **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})


def ensure_model(a, p) -> str:
    """The random-init model directory: built on the device in the run's dtype, or reused. Returns a line to report."""
    import torch
    from transformers import AutoModelForCausalLM

    out, want = p["model"], dict(shape=a.shape, config=SHAPES[a.shape], precision=a.precision)
    marker = out / "gpu_bench_model.json"
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return f"model {out} reused"
    config, dtype = model_config(a, p), getattr(torch, PRECISION[a.precision][0])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # Qwen2ForCausalLM, weights made on the device
    sync()
    t1 = time.perf_counter()
    model.save_pretrained(tmp)  # safetensors
    t2 = time.perf_counter()
    n = sum(t.numel() for t in model.parameters())
    del model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (tiny_dir(p) / name).exists():
            shutil.copy(tiny_dir(p) / name, tmp / name)
    tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    (tmp / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "model_max_length": COMMON["max_position_embeddings"]}, indent=2))
    marker_tmp = tmp / marker.name
    marker_tmp.write_text(json.dumps(want))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    size = sum(f.stat().st_size for f in out.iterdir()) / GIB
    return (f"model {a.shape} {a.precision}: {n:,} parameters created on {a.device} in {t1 - t0:.1f} s, "
            f"saved ({size:.1f} GiB safetensors) in {t2 - t1:.1f} s -> {out}")


def write_data(a, p) -> None:
    text = "".join(json.dumps(r) + "\n" for r in cpu.make_conversations(a.examples, a.seed))
    if not p["train"].exists() or p["train"].read_text() != text:
        p["train"].parent.mkdir(parents=True, exist_ok=True)
        p["train"].write_text(text)


# ---------------------------------------------------------------------------------------------- configs
def ql_config(a, p, variant: str) -> dict:
    features = cpu.resolve_features(variant.removesuffix("-nockpt"))  # the feature keys this qwenloop knows
    return {
        "model": str(p["model"]), "train_file": str(p["train"]), "output_dir": str(p["runs"] / variant),
        "overwrite_output_dir": True, "attn_implementation": a.attn,
        "gradient_checkpointing": variant not in NO_CHECKPOINTING, "gradient_checkpointing_reentrant": False,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": cpu.TARGETS},
        "max_seq_len": a.max_seq_len, "micro_batch_size": a.rows if features.get("packing") else a.micro_batch,
        "gradient_accumulation_steps": 1, "learning_rate": LR, "weight_decay": 0.0, "lr_scheduler": "cosine",
        "max_grad_norm": CLIP, "warmup_steps": warmup_steps(a), "num_epochs": 1, "max_steps": a.steps, "seed": a.seed,
        "log_every_steps": 1, **features}


def hf_arguments(a, p) -> dict:
    return dict(
        output_dir=str(p["runs"] / "hf"), per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=warmup_steps(a), weight_decay=0.0,
        optim="adamw_torch_fused" if a.device == "cuda" else "adamw_torch",  # qwenloop: fused AdamW on a GPU
        max_grad_norm=CLIP, max_steps=a.steps, seed=a.seed, bf16=a.precision == "bf16", fp16=a.precision == "fp16",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=a.device == "cpu",
        report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)


def warmup_steps(a) -> int:
    return math.ceil(WARMUP_RATIO * a.steps)


def sdpa_kernels(a) -> str:
    return a.sdpa if a.sdpa != "auto" else ("v100" if a.precision == "fp16" else "all")


def child_env(a, p) -> dict:
    env = dict(cpu.CHILD_ENV, ACCELERATE_MIXED_PRECISION=PRECISION[a.precision][1], HF_DATASETS_CACHE=str(p["cache"]))
    if a.device == "cpu":
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    return env


# ---------------------------------------------------------------------------------------------- children
def child(a) -> None:
    import torch

    p = paths(a)
    if a.device == "cuda" and sdpa_kernels(a) == "v100":  # sm70 has no flash kernel; keep what it has
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    name = torch.cuda.get_device_name() if a.device == "cuda" else None
    from qwenloop.flops import peak_tflops

    peak = peak_tflops(name, PRECISION[a.precision][1])
    start = time.perf_counter()
    r = (train_hf if a.variant == "hf" else train_qwenloop)(a, p)
    k = min(a.skip, len(r["step_s"]) - 1)  # steady state: the steps after the first k
    seconds = sum(r["step_s"][k:])
    result = dict(
        variant=a.variant, steps=len(r["step_s"]), steady_steps=len(r["step_s"]) - k, loop_seconds=sum(r["step_s"]),
        steady_seconds=seconds, target_tokens=sum(r["targets"]), tokens=sum(r["tokens"]),
        tokens_per_step=statistics.mean(r["tokens"]), target_tokens_per_s=sum(r["targets"][k:]) / seconds,
        tokens_per_s=sum(r["tokens"][k:]) / seconds, model_tflops_per_s=sum(r["flops"][k:]) / seconds / 1e12,
        peak_tflops=peak, gpu=name, train_loss=cpu.per_target_token(r["losses"], r["targets"]),
        first_loss=r["losses"][0], last_loss=r["losses"][-1], mem_alloc_gib=r["mem"][0], mem_reserved_gib=r["mem"][1],
        child_seconds=time.perf_counter() - start, sdpa=sdpa_kernels(a), attn=a.attn)
    result["mfu"] = result["model_tflops_per_s"] / peak if peak else None
    Path(a.result).write_text(json.dumps(result))


def load_data(a, p):
    import qwenloop
    from qwenloop.data import build_dataset
    from qwenloop.model import load_tokenizer

    cfg = qwenloop.TrainConfig.from_dict({"model": str(p["model"]), "train_file": str(p["train"]), "max_seq_len": a.max_seq_len})
    tok = load_tokenizer(cfg)
    return tok, build_dataset(str(p["train"]), tok, cfg).dataset


def padded_steps(ds, a, steps: int) -> list[tuple[int, int, int]]:
    """(target tokens, tokens, causal attention pairs) of each of the first `steps` padded micro-batches
    in qwenloop's order: what the HF Trainer trains (same sampler, same micro-batch)."""
    from qwenloop.data import EpochShuffleSampler

    order, b = list(EpochShuffleSampler(len(ds), a.seed, shuffle=True)), a.micro_batch
    lengths, targets = [len(x) for x in ds["input_ids"]], ds["num_targets"]
    idx = [order[s * b:(s + 1) * b] for s in range(steps)]
    return [(sum(targets[i] for i in ix), sum(lengths[i] for i in ix), sum(lengths[i] * (lengths[i] + 1) // 2 for i in ix)) for ix in idx]


def device_peak(a) -> tuple[float, float]:
    import torch

    if a.device == "cuda":
        return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return rss, rss


def train_hf(a, p) -> dict:
    import torch, transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from qwenloop.data import EpochShuffleSampler
    from qwenloop.flops import decoder_shape, step_flops

    tok, ds = load_data(a, p)
    transformers.set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=getattr(torch, PRECISION[a.precision][0]), attn_implementation=a.attn)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=cpu.TARGETS))
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return EpochShuffleSampler(len(self.train_dataset if train_dataset is None else train_dataset), a.seed, shuffle=True)

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.marks.append(time.perf_counter())

    clock = Clock()
    trainer = OrderedTrainer(
        model=model, args=TrainingArguments(**hf_arguments(a, p)), train_dataset=ds.select_columns(["input_ids", "labels"]),
        callbacks=[clock], data_collator=DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100))
    trainer.train()
    mem = device_peak(a)
    step_s = [t1 - t0 for t0, t1 in zip(clock.marks, clock.marks[1:])]
    counts = padded_steps(ds, a, len(step_s))
    shape = decoder_shape(model.get_base_model().config, 16, cpu.TARGETS)
    return dict(step_s=step_s, targets=[c[0] for c in counts], tokens=[c[1] for c in counts], mem=mem,
                flops=[step_flops(shape, tokens, targets, pairs, True)[0] for targets, tokens, pairs in counts],
                losses=[h["loss"] for h in trainer.state.log_history if "loss" in h])


def train_qwenloop(a, p) -> dict:
    import torch
    import qwenloop
    from qwenloop.flops import peak_tflops
    from qwenloop.metrics import StepMeter

    cfg = qwenloop.TrainConfig.from_dict(ql_config(a, p, a.variant))
    # A known peak makes every metrics line carry its FLOPs (mfu x step_s x peak); 1.0 where none is known (CPU).
    name = torch.cuda.get_device_name() if a.device == "cuda" else None
    cfg.peak_tflops = peak_tflops(name, PRECISION[a.precision][1]) or 1.0
    # Wall time from step end to step end (logging included), as the HF side is timed: the loop has read
    # the step's numbers back (a device sync) just before end_step.
    marks: list[float] = []

    def start_step(self, _original=StepMeter.start_step):
        if not marks:
            marks.append(time.perf_counter())
        return _original(self)

    def end_step(self, counts, _original=StepMeter.end_step):
        marks.append(time.perf_counter())
        return _original(self, counts)

    StepMeter.start_step, StepMeter.end_step = start_step, end_step
    qwenloop.train(cfg)
    out = Path(cfg.output_dir)
    run = json.loads((out / "run.json").read_text())
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    seen = [m["target_tokens"] for m in steps]
    tokens = [m["tokens"] for m in steps]
    peak = run["peak_memory_per_rank"][0]
    wall = [t1 - t0 for t0, t1 in zip(marks, marks[1:])]
    return dict(step_s=wall if len(wall) == len(steps) else [m["step_s"] for m in steps], losses=[m["loss"] for m in steps],
                targets=[now - before for before, now in zip([0] + seen[:-1], seen)],
                tokens=[now - before for before, now in zip([0] + tokens[:-1], tokens)],
                flops=[m["mfu"] * m["step_s"] * cfg.peak_tflops * 1e12 for m in steps],
                mem=(peak.get("allocated_gib", peak.get("rss_gib")), peak.get("reserved_gib", peak.get("rss_gib"))))


# ---------------------------------------------------------------------------------------------- isolation
def isolation(a) -> int:
    """Three demo examples packed in one row (PackingCollator): each one's loss inside the row vs alone,
    per attention implementation, in bf16 (fp32 on CPU). PASS when every |diff| <= 1e-2."""
    import importlib.util
    import torch
    import torch.nn.functional as F
    import qwenloop
    from transformers import AutoModelForCausalLM
    from qwenloop.batching import PackingCollator
    from qwenloop.data import build_dataset
    from qwenloop.model import load_tokenizer

    p = paths(a)
    os.environ.update(HF_DATASETS_CACHE=str(p["cache"]))
    tiny, demo = tiny_dir(p), str(cpu.ROOT / "examples" / "data" / "demo.jsonl")
    cfg = qwenloop.TrainConfig.from_dict({"model": str(tiny), "train_file": demo, "max_seq_len": 2048})
    tok = load_tokenizer(cfg)
    ds = build_dataset(demo, tok, cfg).dataset
    examples = [{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in range(3)]
    batch = PackingCollator(tok.pad_token_id)([examples])
    dev, dtype = a.device, (torch.bfloat16 if a.device == "cuda" else torch.float32)
    impls = ["sdpa"] if dev == "cuda" else ["sdpa", "eager"]
    if dev == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401

            impls.append("flash_attention_2")
        except Exception as e:  # noqa: BLE001
            print(f"flash_attn present but does not import ({type(e).__name__}: {e}); flash_attention_2 not checked")
    else:
        print("flash_attn not installed: flash_attention_2 not checked")
    if dev == "cuda":
        impls.append("flex_attention")  # last: torch.compile makes it the slow one

    def losses(model, logits):
        out, at = [], 0
        for e in examples:
            n, labels = len(e["input_ids"]), torch.tensor(e["labels"][1:], device=dev)
            alone = model(input_ids=torch.tensor([e["input_ids"]], device=dev), use_cache=False).logits[0].float()
            out.append((F.cross_entropy(alone[:-1], labels, ignore_index=-100).item(),
                        F.cross_entropy(logits[at:at + n - 1], labels, ignore_index=-100).item()))
            at += n
        return out

    failed, control = 0, None
    print(f"packed row: {[len(e['input_ids']) for e in examples]} tokens; {dtype}, tolerance {a.tolerance:g}")
    for impl in impls:
        try:
            model = AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype, attn_implementation=impl).to(dev).eval()
            model.config.use_cache = False
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"].to(dev), position_ids=batch["position_ids"].to(dev), use_cache=False).logits[0].float()
                pairs = losses(model, logits)
                if impl == "sdpa":  # the control: a 2D all-ones mask turns packing detection off (cross-talk)
                    crossed = model(input_ids=batch["input_ids"].to(dev), attention_mask=torch.ones_like(batch["input_ids"]).to(dev),
                                    position_ids=batch["position_ids"].to(dev), use_cache=False).logits[0].float()
                    control = max(abs(x - y) for x, y in losses(model, crossed))
            worst = max(abs(x - y) for x, y in pairs)
            ok = worst <= a.tolerance
            failed += not ok
            print(f"isolation {impl}: alone {[round(x, 4) for x, _ in pairs]} in row {[round(y, 4) for _, y in pairs]} "
                  f"max |diff| {worst:.2e} -> {'PASS' if ok else 'FAIL'}")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"isolation {impl}: ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -> FAIL")
    if control is not None:
        print(f"control (sdpa, all-ones attention_mask: attention crosses examples): max |diff| {control:.2e} "
              f"({'the check can see cross-talk' if control > a.tolerance else 'WARNING: cross-talk invisible at this tolerance'})")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- parent
def report(a, p, runs: list[dict], built: str, info: dict) -> str:
    base = next((r for r in runs if r["variant"] == "hf"), None)
    cfg = SHAPES[a.shape]
    lines = [f"# qwenloop vs HF Trainer + PEFT on the GPU: {a.shape}, {a.precision}", "", f"Command: `{a.command}`", "",
             f"Machine: {info.get('gpu') or 'no GPU'}; {info['nproc']} CPUs; torch {info['torch']} (CUDA {info['cuda']}), "
             f"transformers {info['transformers']}, peft {info['peft']}, accelerate {info['accelerate']}", "",
             f"Model: random-init Qwen2 {cfg}. {built}", "",
             f"Job: LoRA r16/a32 on {len(cpu.TARGETS)} projections, {a.precision} (base weights in it, autocast, fp32 LoRA), "
             f"attention {a.attn} (sdpa kernels: {sdpa_kernels(a)}), non-reentrant gradient checkpointing (not in *-nockpt), "
             f"{a.steps} steps, padded micro-batch {a.micro_batch}, packed {a.rows} row(s) of {a.max_seq_len}, seed {a.seed}; "
             f"rates over steps {a.skip + 1}..{a.steps}.", "",
             "| variant | steps | tokens/step | target tok/s | all tok/s | speed x | model TFLOP/s | MFU | peak alloc GiB | reserved GiB | memory x | train loss | loss step 1 -> last | child s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        speed = f"{r['target_tokens_per_s'] / base['target_tokens_per_s']:.2f}" if base else "-"
        mem = f"{r['mem_alloc_gib'] / base['mem_alloc_gib']:.2f}" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['variant']} | {r['steps']} | {r['tokens_per_step']:.0f} | {r['target_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{speed} | {r['model_tflops_per_s']:.3g} | {mfu} | {r['mem_alloc_gib']:.2f} | {r['mem_reserved_gib']:.2f} | {mem} | "
                     f"{r['train_loss']:.4f} | {r['first_loss']:.4f} -> {r['last_loss']:.4f} | {r['child_seconds']:.0f} |")
    for v in a.variants:
        if not any(r["variant"] == v for r in runs):
            lines.append(f"| {v} | not run / failed | | | | | | | | | | | | |")
    lines += ["", "*target tok/s*: assistant tokens trained / steady-state seconds; *all tok/s*: non-pad tokens; *speed x*, "
              "*memory x*: relative to hf; *model TFLOP/s* and *MFU*: qwenloop.flops.step_flops (frozen base, head at target "
              "positions, no recompute) / time (/ the GPU's dense peak); peak memory: torch.cuda.max_memory_allocated / reserved "
              "of the child (CPU: peak RSS); *train loss*: per target token over all steps (packed variants see other batches)."]
    return "\n".join(lines) + "\n"


def run_child(a, p, variant: str) -> dict | None:
    result, log = p["runs"] / f"{variant}.result.json", p["logs"] / f"{a.shape}-{a.precision}-{variant}.log"
    for path in (result, log):
        path.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(child_command(a, p, variant), stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **child_env(a, p)}).returncode
    if rc != 0 or not result.exists():
        print(f"  {variant}: FAILED (rc={rc}), log {log}:\n" + "".join(open(log, errors="replace").readlines()[-15:]), flush=True)
        return None
    r = json.loads(result.read_text())
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    print(f"  {variant}: {r['target_tokens_per_s']:.0f} target tok/s, {r['tokens_per_s']:.0f} tok/s, {r['model_tflops_per_s']:.3g} "
          f"TFLOP/s{mfu}, {r['mem_alloc_gib']:.1f} GiB, loss {r['train_loss']:.4f} ({r['child_seconds']:.0f} s)", flush=True)
    return r


def child_command(a, p, variant: str) -> list[str]:
    argv = [x for x in a.argv if x != "--dry-run"]
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant, "--result", str(p["runs"] / f"{variant}.result.json")]


def machine(a) -> dict:
    import torch

    info = cpu.machine()
    info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if a.device == "cuda" else None)
    return info


def dry_run(a, p) -> None:
    import torch
    import qwenloop
    from transformers import AutoModelForCausalLM

    config = model_config(a, p)
    with torch.device("meta"):
        n = sum(t.numel() for t in AutoModelForCausalLM.from_config(config).parameters())
    shown = {k: v for k, v in config.to_diff_dict().items() if k != "layer_types"}
    print(f"model {a.shape}: {n / 1e9:.3f}B parameters (meta device), dir {p['model']}\n{json.dumps(shown)}")
    print(f"data: {p['train']} ({a.examples} conversations); sdpa kernels: {sdpa_kernels(a)}; child env: {child_env(a, p)}")
    for v in a.variants:
        print(f"\n== {v}: {shlex.join(child_command(a, p, v))}")
        if v == "hf":
            print(f"TrainingArguments({json.dumps(hf_arguments(a, p))})")
        else:
            cfg = qwenloop.TrainConfig.from_dict(ql_config(a, p, v))  # validated
            print(f"TrainConfig: {json.dumps({k: getattr(cfg, k) for k in ql_config(a, p, v)}, default=str)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-1.5b")
    ap.add_argument("--precision", choices=list(PRECISION), default="bf16")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the rates (warm-up, autotuning)")
    ap.add_argument("--micro-batch", type=int, default=8, help="examples per padded micro-batch (hf, ql-head)")
    ap.add_argument("--rows", type=int, default=4, help="packed rows of --max-seq-len tokens per micro-batch (ql-pack*)")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--examples", type=int, default=1200, help="training conversations (~230 tokens each)")
    ap.add_argument("--variants", nargs="+", default=["hf", "ql-head", "ql-pack"], choices=list(VARIANTS))
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention", "flash_attention_2"])
    ap.add_argument("--sdpa", default="auto", choices=["auto", "all", "v100"], help="sdpa kernels: auto = v100 (no flash/cuDNN) for fp16")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default="/tmp/qwenloop-gpu-bench", help="models, data, caches, run dirs")
    ap.add_argument("--logs", default=None, help="children's logs (default: WORKDIR/logs)")
    ap.add_argument("--out", default=None, help="markdown report (default: bench/results/gpu_bench-SHAPE-PRECISION.md); JSON next to it")
    ap.add_argument("--dry-run", action="store_true", help="print the model config, the run configs and the child command lines")
    ap.add_argument("--isolation", action="store_true", help="packing isolation check (tiny model) instead of the benchmark")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="isolation: largest |loss in row - loss alone|")
    ap.add_argument("--child", dest="variant", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    p = paths(a)
    os.environ.update(cpu.CHILD_ENV, HF_DATASETS_CACHE=str(p["cache"]))
    if a.isolation:
        return isolation(a)
    if a.variant:
        return child(a)
    if a.steps * a.micro_batch > a.examples:
        sys.exit(f"--steps {a.steps} x --micro-batch {a.micro_batch} needs more than --examples {a.examples}")
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.command = "python3 " + shlex.join([os.path.relpath(__file__), *a.argv])
    out = Path(a.out or cpu.ROOT / "bench" / "results" / f"gpu_bench-{a.shape}-{a.precision}.md")
    write_data(a, p)
    if a.dry_run:
        return dry_run(a, p) or 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"gpu_bench: stopped (SIGTERM, e.g. timeout); report so far: {out}"))
    built = ensure_model(a, p)
    print(built, flush=True)
    info, runs = machine(a), []
    for v in a.variants:
        if r := run_child(a, p, v):
            runs.append(r)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report(a, p, runs, built, info))
        out.with_suffix(".json").write_text(json.dumps(dict(command=a.command, machine=info, shape=SHAPES[a.shape], runs=runs), indent=1))
    print("\n" + out.read_text() + f"written: {out}")
    return 0 if len(runs) == len(a.variants) else 1


if __name__ == "__main__":
    sys.exit(main())
