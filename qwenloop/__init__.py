"""qwenloop: fine-tune Qwen causal LMs with LoRA/QLoRA in a hand-written Accelerate loop.

    from qwenloop import TrainConfig, train
    result = train(TrainConfig.from_yaml("my.yaml", ["--max_steps", "100"]))
"""

from .config import LoraSettings, QuantizationSettings, TrainConfig
from .errors import UserError

# Imported eagerly: `qwenloop.train` must stay the function even after the `qwenloop.train` module
# is imported somewhere (a lazy wrapper would be shadowed by the submodule attribute).
from .train import TrainResult, train  # noqa: E402

__version__ = "0.1.0"

__all__ = ["TrainConfig", "LoraSettings", "QuantizationSettings", "TrainResult", "UserError", "train", "__version__"]
