"""`qwenloop merge`: merged logits equal base + adapter, the output loads like any model (sharded or not, in the
requested dtype), QLoRA adapters go into the de-quantized base, peak RSS stays near one shard on a multi-shard
model (measured in a fresh process), and bad input is one line, exit code 2, nothing written."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from after_training import copy_adapter, listing, logits, trained_adapter
from conftest import REPO
from qwenloop.cli import main as cli_main


@pytest.fixture(scope="module")
def adapter(tiny_model, train_jsonl):
    return trained_adapter(tiny_model, train_jsonl)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def peft_logits(model_dir, adapter_dir, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, str(adapter_dir)), input_ids)


def test_merged_model_equals_base_plus_adapter(tiny_model, adapter, input_ids, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli_main(["merge", "--model", tiny_model, "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    assert "merged 14 LoRA weights" in capsys.readouterr().out
    expected, merged = peft_logits(tiny_model, adapter, input_ids), logits(out, input_ids)
    assert (expected - logits(tiny_model, input_ids)).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= set(listing(out))
    assert not any(name.startswith("adapter_") or name == "tiny_build.json" for name in listing(out))
    assert not any(".tmp-" in name for name in listing(tmp_path))


def test_merged_model_answers_like_the_adapter(tiny_model, adapter, tmp_path):
    """What a serving engine would answer with the merged model is what generate answers with the adapter."""
    from qwenloop.generate import generate
    from qwenloop.merge import merge_adapter

    from after_training import PROMPTS

    merge_adapter(tiny_model, str(adapter), str(tmp_path / "merged"), dtype="fp32", echo=lambda _: None)
    with_adapter = generate(tiny_model, PROMPTS, str(adapter), max_new_tokens=12)
    merged = generate(str(tmp_path / "merged"), PROMPTS, max_new_tokens=12)
    assert [a.adapted for a in with_adapter] == [a.base for a in merged]


def resave_sharded(model_dir, out_dir, dtype=torch.float32, max_shard_size="150KB"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out_dir))
    return out_dir


def test_sharded_base_keeps_its_layout_in_every_dtype(tiny_model, adapter, input_ids, tmp_path):
    from safetensors import safe_open

    from qwenloop.merge import merge_adapter

    sharded = resave_sharded(tiny_model, tmp_path / "sharded")
    base_index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) >= 3
    merge_adapter(str(sharded), str(adapter), str(tmp_path / "fp32"), echo=lambda _: None)  # default: the base's dtype
    torch.testing.assert_close(logits(tmp_path / "fp32", input_ids), peft_logits(tiny_model, adapter, input_ids),
                               rtol=1e-5, atol=1e-5)
    result = merge_adapter(str(sharded), str(adapter), str(tmp_path / "bf16"), dtype="bf16", echo=lambda _: None)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"] and result.shards == len(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] * 2 == base_index["metadata"]["total_size"]
    for file in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "bf16" / file), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # bf16 rounding of the merged weights, nothing more
    torch.testing.assert_close(logits(tmp_path / "bf16", input_ids), logits(tmp_path / "fp32", input_ids), rtol=0.05, atol=0.05)


def test_qlora_adapter_is_merged_into_the_dequantized_base(tiny_model, train_jsonl, input_ids, tmp_path, capsys):
    qlora = trained_adapter(tiny_model, train_jsonl, quantized=True)
    capsys.readouterr()
    assert cli_main(["merge", "--model", tiny_model, "--adapter", str(qlora), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    said = capsys.readouterr().out
    assert "QLoRA adapter (trained on a 4-bit nf4 quantized base): merged into the de-quantized base" in said
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    torch.testing.assert_close(logits(tmp_path / "m", input_ids), peft_logits(tiny_model, qlora, input_ids), rtol=1e-5, atol=1e-5)


def test_peft_variants_merge_exactly(tiny_model, input_ids, tmp_path):
    """rsLoRA, alpha_pattern, LoRA on the embedding and trained biases (bias: all), from PEFT's own save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwenloop.merge import merge_adapter

    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"v_proj": 3},
                        target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"], bias="all")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    for name, param in model.named_parameters():
        if param.requires_grad:  # LoRA halves and every bias: all non-zero, all different from the base
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(str(tmp_path / "adapter"))
    expected = logits(model, input_ids)
    merge_adapter(tiny_model, str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype="fp32", echo=lambda _: None)
    assert (expected - logits(tiny_model, input_ids)).abs().max() > 0.1
    torch.testing.assert_close(logits(tmp_path / "merged", input_ids), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# memory: one shard, not the model
# --------------------------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys
    from qwenloop.merge import merge_adapter
    import safetensors.torch, yaml, qwenloop.storage  # what merge imports lazily: loaded before the baseline

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS: the peak below is the merge's alone
    result = merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], echo=lambda _: None)
    print("RESULT" + json.dumps({"before": before, "peak": status("VmHWM"), "largest_shard": result.largest_shard_bytes,
                                 "model": result.model_bytes, "shards": result.shards}))
""")


def build_multishard_model(directory):
    """A random Qwen2 of ~94M parameters in bf16 (~180 MiB; tensors of 4 MiB at most), saved in shards of at most
    20 MB, and a rank-4 LoRA adapter on all its projections with non-zero B (every adapted weight really changes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(directory / "base"), max_shard_size="20MB")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    peft_model.save_pretrained(str(directory / "adapter"))
    return directory / "base", directory / "adapter"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_merge_peak_rss_stays_near_one_shard(tmp_path):
    base, adapter = build_multishard_model(tmp_path)
    # glibc serves allocations below its mmap threshold from a heap it keeps after free(); the threshold follows the
    # largest block freed, up to 32 MiB. A real model's tensors (hundreds of MB) are above that cap, each mapped and
    # returned on free; this model's (1-4 MiB) are not, so the threshold is pinned to give them the same treatment.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(base), str(adapter), str(tmp_path / "merged")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("RESULT")))
    growth, adapter_bytes = m["peak"] - m["before"], os.path.getsize(adapter / "adapter_model.safetensors")
    mib = 2 ** 20
    print(f"\nmerge of a {m['model'] / mib:.0f} MiB bf16 model in {m['shards']} shards (largest {m['largest_shard'] / mib:.1f} MiB) "
          f"with a {adapter_bytes / mib:.1f} MiB adapter: peak RSS {m['peak'] / mib:.0f} MiB, {growth / mib:.1f} MiB above the "
          f"{m['before'] / mib:.0f} MiB the process held before merging ({growth / m['largest_shard']:.2f} x the largest shard, "
          f"{growth / m['model']:.3f} x the model)")
    assert m["shards"] >= 8 and m["model"] > 8 * m["largest_shard"]  # the case means something: many shards
    # The adapter (read whole: MBs) plus one shard's worth; reading the whole model would be ~10x this.
    assert growth < adapter_bytes + 1.5 * m["largest_shard"], "merge holds more than a shard: is it reading the whole model?"


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------------


def refused(capsys, argv, tmp_path) -> str:
    """Run `qwenloop merge argv` expecting exit code 2 and nothing new under tmp_path/out's parent."""
    before = listing(tmp_path)
    assert cli_main(["merge", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert listing(tmp_path) == before, "a refused merge wrote something"
    return err


def test_adapter_of_another_base_names_the_tensor(tiny_model, adapter, tmp_path, capsys):
    spoiled = copy_adapter(adapter, tmp_path / "shape", reshape="layers.0.self_attn.k_proj.lora_A")
    err = refused(capsys, ["--model", tiny_model, "--adapter", str(spoiled), "--out", str(tmp_path / "out")], tmp_path)
    assert "tensor base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in err
    assert "model.layers.0.self_attn.k_proj.weight of shape [32, 67]" in err and "has [32, 64]" in err
    spoiled = copy_adapter(adapter, tmp_path / "name", rename=("self_attn.q_proj", "self_attn.qkv"))
    err = refused(capsys, ["--model", tiny_model, "--adapter", str(spoiled), "--out", str(tmp_path / "out")], tmp_path)
    assert "self_attn.qkv.weight, which model" in err and "does not have" in err


def test_output_directory_holding_a_model_needs_overwrite(tiny_model, adapter, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["merge", "--model", tiny_model, "--adapter", str(adapter), "--out", str(out)]) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    err = refused(capsys, ["--model", tiny_model, "--adapter", str(adapter), "--out", str(out), "--dtype", "bf16"], tmp_path)
    assert "already holds a model; pass --overwrite" in err and (out / "model.safetensors").stat().st_mtime_ns == first
    assert cli_main(["merge", "--model", tiny_model, "--adapter", str(adapter), "--out", str(out), "--dtype", "bf16", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16" and listing(tmp_path) == ["out"]
    refused(capsys, ["--model", tiny_model, "--adapter", str(adapter), "--out", tiny_model], tmp_path)  # never the base


def test_a_dtype_the_machine_cannot_hold_is_refused(tiny_model, adapter, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 400_000, 400_000))
    argv = ["--model", tiny_model, "--adapter", str(adapter), "--out", str(tmp_path / "out")]
    err = refused(capsys, argv + ["--dtype", "fp32"], tmp_path)  # 0.54 MiB in fp32: does not fit 0.4 MB
    assert err.startswith("error: --dtype fp32: the merged model is") and "free space, choose a smaller --dtype" in err
    monkeypatch.undo()
    monkeypatch.setattr("qwenloop.merge.available_ram", lambda: 50_000)
    err = refused(capsys, argv + ["--dtype", "fp32"], tmp_path)
    assert "needs" in err and "GiB of RAM" in err


def test_unsupported_adapters_and_bases_are_refused(tiny_model, adapter, tmp_path, capsys):
    dora = copy_adapter(adapter, tmp_path / "dora", config={"use_dora": True})
    err = refused(capsys, ["--model", tiny_model, "--adapter", str(dora), "--out", str(tmp_path / "out")], tmp_path)
    assert "use_dora is set" in err
    quantized = tmp_path / "prequantized"
    quantized.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        os.symlink(os.path.join(tiny_model, name), quantized / name)
    config = json.loads(open(os.path.join(tiny_model, "config.json")).read())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    err = refused(capsys, ["--model", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "out")], tmp_path)
    assert "stored bitsandbytes-quantized" in err
