"""Every page of the documentation holds: the README and each page of `docs/` (in the site's
order) run their code blocks in order, in one scratch directory, and the site builds strictly.

A `bash` or `python` block is a command a user pastes, so it runs, unless the line just above it
is `<!-- not run: REASON -->` (it needs a GPU, another machine, or serves until stopped). Blocks
in `text`, `json` or `toml` are output or file contents, not commands. The commands are the real
ones users paste (`python gpt.py` trains for hours), so bash blocks run under real bash with
small stand-ins first on PATH:
- `tinygpt train`, `python gpt.py`, `python bigram.py`: run for real, with flags appended that
  make the run tiny (argparse lets the last flag win): 2 steps, a 1-layer model with a block of
  32 (below what a 6-character prompt and 50 new tokens need: examples must not assume more), the
  tiny text when no --data is given;
- `tinygpt` anything else (sample, eval, runs, plot, export, ...): run for real, unchanged;
- `tinygpt serve`: started in the background on a free port, serving a copy of the run under
  another directory name (examples must not hard-code a run's name); `curl` and the Python
  blocks that call the documented address (port 8000) are pointed at the first server started;
- `torchrun`: its tinygpt arguments are parsed by tinygpt's own parser (flags must exist), not run;
- `pip install`: checked against the installs the project supports, not run (this test's
  environment is that install);
- `python -m pytest`: not run (it is the command running this test); other `python -m pytest
  FILES` commands neither (the suite runs those files itself);
- `python benchmarks/report.py`: run with `--smoke` (tiny settings), every row but cpu-10min's,
  which is cpu-quick's code with another preset; `benchmarks/time_to_loss.py` with `--runs 1`;
- the one block that downloads GPT-2 from the Hugging Face hub gets a tiny random GPT-2 saved
  locally instead (no network here).
Python blocks run with `exec` in the same directory, after the blocks before them.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, TINY_TEXT

README = REPO / "README.md"
COMMANDS, OUTPUTS = {"bash", "python"}, {"text", "json", "toml"}
NOT_RUN = re.compile(r"^<!-- not run: (\S.*\S) -->$")
FAST = ["--max-iters", "2", "--eval-interval", "1", "--eval-iters", "1", "--batch-size", "2",
        "--sample-chars", "20", "--no-plot", "--device", "cpu", "--max-time", "0"]
FRESH = ["--n-layer", "1", "--n-head", "2", "--n-embd", "48", "--block-size", "32"]  # vocab <= width: exportable
TEXT = TINY_TEXT + "ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 20  # the README's prompts
INSTALLS = {"torch --index-url https://download.pytorch.org/whl/cpu", "-e .", "-e .[test]", "-e .[hf]",
            "-e .[docs]"}  # as bash passes them (quotes gone)


def pages() -> list[Path]:
    """The README, then every page of the site in its navigation order."""
    import yaml

    def walk(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from walk(value) if isinstance(value, list) else [REPO / "docs" / value]

    return [README, *walk(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])]


def code_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, why it is not run or None) of every fenced block."""
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.match(before)
        blocks.append((m.group(1), m.group(2), marker.group(1) if marker else None))
    return blocks


SHIM = '''#!{python}
import os, subprocess, sys
sys.path.insert(0, {src!r})
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
real = {python!r}
fast, fresh, tiny = {fast!r}, {fresh!r}, {tiny!r}

def ports(path):
    out = {{}}
    for line in open(path).read().splitlines():
        pid, port, asked = line.split()
        out.setdefault(asked, port)
    return out

def shorten(argv):
    extra = list(fast)
    if "--resume" not in argv and "--init-from" not in argv:
        extra += fresh
    if "--data" not in argv and "--resume" not in argv:
        extra += ["--data", tiny]
    return argv + extra

if name == "tinygpt" and args[:1] == ["serve"]:
    # In the background on a free port (the README's port may be taken); curl and the Python
    # blocks are pointed at the first one started.
    import re, shutil, time
    log = open(os.path.join({servers!r}, f"serve-{{time.monotonic_ns()}}.log"), "w+")
    asked = args[args.index("--port") + 1] if "--port" in args else "8000"  # the port the page's examples use
    if "--ckpt" in args:  # the run under another name: an example that hard-codes a name fails
        i = args.index("--ckpt") + 1
        renamed = os.path.join({servers!r}, f"renamed-{{time.monotonic_ns()}}", "served-" + os.path.basename(args[i]))
        shutil.copytree(args[i], renamed)
        args[i] = renamed
    proc = subprocess.Popen([real, "-m", "tinygpt", *args, "--port", "0"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not re.search(r"API http://[^:]+:(\\d+)/v1", open(log.name).read()):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("tinygpt serve did not start: " + open(log.name).read())
        time.sleep(0.05)
    port = re.search(r"API http://[^:]+:(\\d+)/v1", open(log.name).read()).group(1)
    with open(os.path.join({servers!r}, "ports"), "a") as f:
        f.write(f"{{proc.pid}} {{port}} {{asked}}\\n")
    sys.exit(0)
if name == "tinygpt":
    argv = shorten(args) if args[:1] == ["train"] else args
    sys.exit(subprocess.call([real, "-m", "tinygpt", *argv]))
if name == "curl":  # each documented port goes to the first server started for it
    for asked, port in ports(os.path.join({servers!r}, "ports")).items():
        args = [a.replace(f"localhost:{{asked}}", f"127.0.0.1:{{port}}").replace(f"127.0.0.1:{{asked}}",
                f"127.0.0.1:{{port}}") for a in args]
    sys.exit(subprocess.call(["/usr/bin/curl", "--fail-with-body", *args]))
if name == "python":
    if args[:2] == ["-m", "pytest"]:
        missing = [a for a in args[2:] if not a.startswith("-") and not os.path.exists(os.path.join({repo!r}, a))]
        sys.exit(3 if missing else 0)  # test files the docs name must exist
    if args[:1] in (["gpt.py"], ["bigram.py"]):
        script = os.path.join({repo!r}, args[0])
        sys.exit(subprocess.call([real, script, *(args[1:] if "--help" in args else shorten(args[1:]))]))
    if args[:1] == ["-c"] and "from_pretrained('gpt2')" in args[1]:
        sys.exit(subprocess.call([real, {make_gpt2!r}, "gpt2"]))
    if args[:1] == ["benchmarks/data_scale.py"]:
        args += ["--sizes", "1"]  # the 1 MB corpus only (the full table makes 1 GB)
    if args[:1] == ["benchmarks/report.py"]:
        args += ["--smoke", "--skip", "cpu-10min"]  # tiny settings; cpu-10min's row is cpu-quick's code
    if args[:1] == ["benchmarks/time_to_loss.py"] and "--runs" in args:
        args[args.index("--runs") + 1] = "1"  # one run of each: the median of one is the plumbing too
    if args[:1] and args[0].startswith("benchmarks/"):
        args[0] = os.path.join({repo!r}, args[0])
    sys.exit(subprocess.call([real, *args]))
if name == "torchrun":
    from tinygpt.cli import build_parser
    build_parser().parse_args(args[args.index("tinygpt") + 1:])  # exits 2 on an unknown flag
    sys.exit(0)
if name == "pip":
    spec = " ".join(args[1:])
    sys.exit(0 if args[:1] == ["install"] and spec in {installs!r} else 3)
'''

MAKE_GPT2 = '''
import sys
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
text = open("input.txt", encoding="utf-8").read()
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
alphabet = pre_tokenizers.ByteLevel.alphabet()
tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False))
fast = PreTrainedTokenizerFast(tokenizer_object=tok)
cfg = GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2, n_head=2)
GPT2LMHeadModel(cfg).save_pretrained(sys.argv[1])
fast.save_pretrained(sys.argv[1])
'''


def test_every_code_block_is_run_or_says_why_not():
    """A block is a command (bash, python) that runs, or says why not; output and file contents
    say what they are (text, json, toml); no block without a language."""
    marked = 0
    for page in pages():
        for lang, code, why in code_blocks(page.read_text(encoding="utf-8")):
            where = f"{page.relative_to(REPO)}: a block beginning {code.splitlines()[0]!r}"
            assert lang in COMMANDS | OUTPUTS, f"{where} has language {lang!r}; use one of {sorted(COMMANDS | OUTPUTS)}"
            assert why is None or lang in COMMANDS, f"{where} is {lang}, not a command: it needs no 'not run'"
            marked += why is not None
    assert marked >= 1  # the marker is recognised (the GPU check is one)
    assert {p.relative_to(REPO / "docs").as_posix() for p in pages()[1:]} == \
        {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}, "a page outside the nav"


def test_readme_is_short_and_installs_the_cpu_build_of_torch():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    first = code_blocks(text)[0]
    assert first[0] == "bash" and first[1].strip() == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    # What the tests need, said where the test command is, not only in a skip message.
    tests = text[text.index("Run the tests"):text.index("## Results")]
    assert "chromium" in tests and "TINYGPT_DATA_DIR" in tests


@pytest.mark.slow
def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: every page in the nav, no broken link or anchor."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "lecture" / "index.html").is_file()


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path):
    work = tmp_path / "work"
    bin_dir = tmp_path / "bin"
    (work / "docs").mkdir(parents=True)
    bin_dir.mkdir()
    servers = tmp_path / "servers"
    servers.mkdir()
    for name in ("my_text.txt", "input.txt", "new.txt", "corpus.txt", "my_corpus/a.txt", "my_corpus/b.txt",
                 "books/one.txt"):
        (work / name).parent.mkdir(exist_ok=True)
        (work / name).write_text(TEXT, encoding="utf-8")
    (work / "letters.jsonl").write_text("".join(json.dumps({"text": p + "\n"}) + "\n" for p in TEXT.split("\n\n") if p),
                                        encoding="utf-8")
    make_gpt2 = tmp_path / "make_gpt2.py"
    make_gpt2.write_text(MAKE_GPT2)
    shim = SHIM.format(python=sys.executable, src=str(REPO / "src"), fast=FAST, fresh=FRESH,
                       tiny=str(work / "input.txt"), repo=str(REPO), make_gpt2=str(make_gpt2), installs=INSTALLS,
                       servers=str(servers))
    for name in ("tinygpt", "python", "torchrun", "pip", "curl"):
        (bin_dir / name).write_text(shim)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO / "src"),
           "TINYGPT_DATA_DIR": str(tmp_path / "no-data-here"), "OMP_NUM_THREADS": "1"}
    # Runs the pages name before they make them (a fine-tune starts from one): made here.
    subprocess.run([str(bin_dir / "tinygpt"), "train", "--data", "input.txt", "--out", "runs/shakespeare"],
                   cwd=work, env=env, check=True, capture_output=True)

    ran = {"bash": 0, "python": 0}
    cwd = os.getcwd()
    try:
        for page in pages():
            blocks = code_blocks(page.read_text(encoding="utf-8"))
            for i, (lang, code, why) in enumerate(blocks):
                if lang not in COMMANDS or why is not None:
                    continue
                name = f"{page.relative_to(REPO)} block {i + 1}"
                where = f"{name} ({lang}):\n{textwrap.indent(code, '    ')}"
                ran[lang] += 1
                if lang == "bash":
                    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env,
                                       capture_output=True, text=True, timeout=600)
                    output = f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
                    assert r.returncode == 0, f"{where}\nfailed with {r.returncode}:\n{output}"
                    assert "Traceback" not in r.stderr, f"{where}\n{r.stderr[-3000:]}"
                    continue
                for line in ((servers / "ports").read_text().splitlines() if (servers / "ports").exists()
                             else []):  # each documented port: the first server started for it
                    _, port, asked = line.split()
                    code = code.replace(f"127.0.0.1:{asked}", f"127.0.0.1:{port}")
                os.chdir(work)
                try:
                    exec(compile(code, name, "exec"), {"__name__": "docs"})
                finally:
                    os.chdir(cwd)
    finally:
        ports = servers / "ports"
        for line in ports.read_text().splitlines() if ports.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(line.split()[0]), signal.SIGTERM)
    assert ran["bash"] >= 20 and ran["python"] >= 4, ran
