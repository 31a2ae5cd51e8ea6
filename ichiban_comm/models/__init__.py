"""Models used by the main job and the benchmarks."""

from .gpt import GPT, GPTConfig, PlainOps

__all__ = ["GPT", "GPTConfig", "PlainOps"]
