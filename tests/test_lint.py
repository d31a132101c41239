"""ruff, as CI's lint: the rules in pyproject.toml hold for the whole tree."""

import shutil
import subprocess
import sys

from conftest import REPO


def test_ruff_is_clean(tmp_path):
    ruff = shutil.which("ruff") or [sys.executable, "-m", "ruff"]
    command = [ruff] if isinstance(ruff, str) else ruff
    r = subprocess.run([*command, "check", "--no-cache", "src", "tests", "benchmarks", "bigram.py", "gpt.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
