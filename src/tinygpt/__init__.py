"""tinygpt: GPT from scratch, as real software.

    from tinygpt import GPTLanguageModel, BigramLanguageModel, CharTokenizer, load_run
"""
# ruff: noqa: E402  (STARTED is taken before the heavy imports)

import time

STARTED = time.perf_counter()  # before torch is imported: "time since the command started"

from tinygpt.checkpoint import load_run
from tinygpt.config import ModelConfig, SampleConfig, TrainConfig
from tinygpt.errors import UserError
from tinygpt.model import BigramLanguageModel, GPTLanguageModel, build_model
from tinygpt.sampling import generate_stream, sample_next_token
from tinygpt.tokenizer import BPETokenizer, CharTokenizer
from tinygpt.train import train

__all__ = [
    "BigramLanguageModel",
    "BPETokenizer",
    "CharTokenizer",
    "GPTLanguageModel",
    "ModelConfig",
    "SampleConfig",
    "TrainConfig",
    "UserError",
    "build_model",
    "generate_stream",
    "load_run",
    "sample_next_token",
    "train",
]
