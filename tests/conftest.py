"""Shared fixtures: the tiny Qwen2 model (built once per session), small data files, run helpers.

Nothing here downloads anything: HF_HUB_OFFLINE is set before transformers/datasets are imported,
and every model is built locally and loaded through `from_pretrained`.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="qwenloop-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", str(_SESSION_TMP / "datasets-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"

# ZeRO-3 optimizer offload runs DeepSpeedCPUAdam, a C++ op DeepSpeed compiles on first use (~45 s on 2 cores).
NEEDS_CPU_ADAM = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++")), reason="no C++ compiler: DeepSpeedCPUAdam (ZeRO-3 offload) cannot be built"
)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from qwenloop.tiny import ensure_tiny_model

    return str(ensure_tiny_model(_SESSION_TMP / "tiny-qwen2"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path: Path, records) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def train_jsonl() -> str:
    """64 conversations of the demo's kind, of uneven lengths (uneven target-token counts per batch)."""
    from qwenloop.tiny import demo_conversations

    return str(write_jsonl(_SESSION_TMP / "data" / "train.jsonl", demo_conversations(64, seed=1)))


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons (state, gradient state): an in-process run must start
    from none, as a fresh process would."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_in_process(config: dict):
    """`qwenloop.train` on a config dict, in this process, with accelerate's singletons reset around it."""
    from qwenloop import TrainConfig, train

    reset_accelerate_state()
    try:
        return train(TrainConfig.from_dict(config))
    finally:
        reset_accelerate_state()


@pytest.fixture
def reset_accelerate():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def base_config(model: str, train_file: str, output_dir, **overrides) -> dict:
    """A small, fast, deterministic training config (dropout 0 so runs can be compared exactly)."""
    cfg = {
        "model": model,
        "train_file": train_file,
        "output_dir": str(output_dir),
        "max_steps": 4,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "max_seq_len": 128,
        "seed": 7,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    Path(path).write_text(yaml.safe_dump(data), encoding="utf-8")
    return Path(path)


def launch(accelerate_yaml: str, train_yaml: Path, env_extra: dict, timeout: int = 600,
           launch_args: tuple = ()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file X [launch_args] -m qwenloop train Y` as a user would run it."""
    env = {**os.environ, **env_extra, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / accelerate_yaml),
           "--main_process_port", str(_free_port()), *launch_args, "-m", "qwenloop", "train", str(train_yaml)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(output_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(output_dir) if "loss" in m]


def load_adapter_tensors(adapter_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def assert_adapter_loads_whole(adapter_dir, model_dir):
    """PEFT loads the adapter, and every tensor has the full shape the model config implies (not a
    rank's shard, not empty). Returns the loaded PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenloop.adapter import verify_adapter
    from qwenloop.model import expected_adapter_shapes

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir))
    verify_adapter(str(adapter_dir), expected_adapter_shapes(loaded))
    return loaded


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "qwenloop", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_adapters_close(dir_a, dir_b, rel: float = 1e-5) -> None:
    """Same keys, shapes, and every tensor within `rel` relative (Frobenius) distance.

    Element-wise tolerances do not suit Adam: an element whose gradient is ~0 gets an update of
    ~lr * g / (|g| + eps), so a 1e-7 roundoff difference in g (another summation order across ranks
    or threads) moves it by up to lr. The tensor as a whole stays within fp32 roundoff.
    """
    import torch

    a, b = load_adapter_tensors(dir_a), load_adapter_tensors(dir_b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        distance = (torch.linalg.vector_norm(a[key] - b[key]) / torch.linalg.vector_norm(b[key])).item()
        assert distance <= rel, f"{key}: relative distance {distance:.2e} > {rel:.0e}"
