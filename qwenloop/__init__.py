"""qwenloop: fine-tune Qwen causal LMs with LoRA/QLoRA in a hand-written Accelerate loop.

    from qwenloop import TrainConfig, train
    result = train(TrainConfig.from_yaml("my.yaml", ["--max_steps", "100"]))
"""

from .config import LoraSettings, QuantizationSettings, TrainConfig
from .errors import UserError

__version__ = "0.1.0"


def train(cfg: TrainConfig):
    """Run one fine-tuning job (see ``qwenloop.train.train``); imported lazily to keep ``import qwenloop`` light."""
    from .train import train as _train

    return _train(cfg)


__all__ = ["TrainConfig", "LoraSettings", "QuantizationSettings", "UserError", "train", "__version__"]
