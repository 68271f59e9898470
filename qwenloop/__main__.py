"""``python -m qwenloop`` / ``accelerate launch -m qwenloop train CONFIG.yaml``."""

from .cli import run

run()
