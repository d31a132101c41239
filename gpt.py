"""The lecture's `python gpt.py`, as a thin entry point: `python gpt.py --help` lists every flag."""

import sys
from pathlib import Path

try:
    from tinygpt.cli import main
except ImportError:  # run from a fresh clone without installing: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from tinygpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--model", "gpt", *sys.argv[1:]], script="gpt.py"))
