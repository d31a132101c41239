"""tinygpt: GPT from scratch, as real software.

    from tinygpt import GPTLanguageModel, BigramLanguageModel, CharTokenizer, load_run

Names are imported on first use (PEP 562), so `import tinygpt` and `tinygpt --help` stay
light: torch is loaded only by the code that needs it.
"""

import importlib
import time

STARTED = time.perf_counter()  # before torch is imported: "time since the command started"

_WHERE = {
    "BigramLanguageModel": "model",
    "GPTLanguageModel": "model",
    "build_model": "model",
    "BPETokenizer": "tokenizer",
    "CharTokenizer": "tokenizer",
    "ModelConfig": "config",
    "SampleConfig": "config",
    "TrainConfig": "config",
    "UserError": "errors",
    "DecodeEngine": "engine",
    "generate_stream": "sampling",
    "sample_next_token": "sampling",
    "load_run": "checkpoint",
}
# The training function is `tinygpt.train.train`: the name `tinygpt.train` is its module, which
# Python binds on the package as soon as anything imports it.

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"tinygpt.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tinygpt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("tinygpt")
    except PackageNotFoundError:
        return "unknown"
