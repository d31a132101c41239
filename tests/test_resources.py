"""Issue 13: running out of memory or disk ends in one line (exit 2 before a model too big is
built, exit 4 when an allocation or a write fails anyway), with the last good checkpoint intact
and the run resumable.

Memory is never really exhausted here (the machine is shared): allocation failures come from a
patched forward pass that asks torch's CPU allocator for 2**61 bytes (refused at once, nothing
allocated) or raises CUDA's error type; the memory the machine reports is patched where a test
needs a fixed figure. Full disks are simulated at each write by failing `os.write` (or the
safetensors writer) for one file name half-way through, and once for real on a small tmpfs.
"""

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, Result, assert_one_line_error, cli, losses_by_step, snapshot, tiny_args
from safetensors import SafetensorError

import tinygpt.checkpoint as ckpt
import tinygpt.plot
import tinygpt.runs as runs
import tinygpt.train
from tinygpt import config as C
from tinygpt import resources
from tinygpt.checkpoint import checkpoint_dir
from tinygpt.model import GPTLanguageModel, build_model

# Reports (and checkpoints) at steps 0, 2, 4, 6.
# The tiny model with dropout (restoring random state must matter), reporting every 2 of 6 steps.
RUN = tiny_args(dropout=0.1, attention="manual", plot=None, eval_interval=2, max_iters=6, batch_size=8,
                eval_iters=2)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def temp_names(run_dir: Path) -> list[str]:
    """Anything a write left behind: temporary files and directories start with a dot."""
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*")]


def latest_step(run_dir: Path) -> int:
    return json.loads((run_dir / "latest.json").read_text())["step"]


# --- the estimate ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [
    {},  # the lecture's GPT
    {"model": "bigram"},
    {"pos_emb": "rope", "norm": "rmsnorm", "tie_embeddings": True, "n_layer": 3},
    {"n_embd": 48, "n_head": 3, "block_size": 32, "activation": "relu2", "qk_norm": True},
    {"n_embd": 48, "n_head": 3, "bigram_embed": True},
    {"n_embd": 48, "n_head": 3, "bigram_embed": True, "vocab_size": 300},  # hashed: a bounded table
], ids=["lecture", "bigram", "rope-rmsnorm-tied", "small", "bigram-input", "bigram-input-hashed"])
def test_param_count_is_the_built_models(values):
    m = C.build(C.ModelConfig, {"vocab_size": 65, **values})
    assert resources.param_count(m) == sum(p.numel() for p in build_model(m).parameters())


# In a fresh process: warm torch up on a tiny model, then the peak RSS a real training step (model,
# AdamW, three steps) adds (VmHWM, reset before them: an earlier peak must not count). glibc is
# told to hand every freed block of 128 KiB or more back to the system, so the peak is what was
# live, not what its free lists kept.
MEASURE = """
import json, resource, sys
import torch
from tinygpt import config as C
from tinygpt.model import build_model
from tinygpt.optim import make_optimizer

def steps(m, batch, n):
    model = build_model(m)
    model.set_attention("manual")
    opt = make_optimizer(model, C.TrainConfig())
    x = torch.randint(0, m.vocab_size, (batch, m.block_size))
    for _ in range(n):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

values, batch = json.loads(sys.argv[1]), int(sys.argv[2])
steps(C.build(C.ModelConfig, {**values, "n_embd": 8, "n_head": 1, "n_layer": 1}), 1, 2)  # one-off costs
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to what is resident now: the peak of the steps alone
before = status("VmRSS")
steps(C.build(C.ModelConfig, values), batch, 3)
print(status("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="measures RSS through Linux's /proc")
@pytest.mark.parametrize("values, batch", [
    ({"n_embd": 256, "n_head": 4, "n_layer": 4, "block_size": 128, "dropout": 0.2}, 32),  # activations
    ({"n_embd": 512, "n_head": 8, "n_layer": 2, "block_size": 64, "dropout": 0.0}, 4),  # weights, AdamW
    ({"n_embd": 128, "n_head": 4, "n_layer": 3, "block_size": 64, "dropout": 0.0, "vocab_size": 2000}, 64),  # logits
], ids=["activations", "weights", "logits"])
def test_memory_estimate_matches_measured_peaks(values, batch):
    """The estimate is a floor of what a training step really holds, and close to it: the live
    peak is between 1.0 and 1.25 times the estimate (measured here 1.07-1.10; the slack is the
    gradients' and the backward's temporaries that the formula leaves out). The peak is the
    process's VmHWM reset just before the steps, so nothing the process did before counts."""
    values = {"vocab_size": 65, **values}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}

    r = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(values), str(batch)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    measured = int(r.stdout)
    estimate = resources.training_memory(C.build(C.ModelConfig, values), batch).total
    assert estimate <= measured <= 1.25 * estimate, (estimate, measured)


def test_available_memory_is_what_the_machine_reports():
    have = resources.available_memory(torch.device("cpu"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < have <= total
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert have > peak_now / 100  # a real figure, not a unit slip (kB read as bytes)
    assert resources.available_memory(torch.device("meta")) is None  # unknown: nothing refused


def test_the_issues_command_is_refused_before_allocating(text_file, tmp_path):
    """`tinygpt train --n-embd 65536 --n-head 1 --n-layer 1` printed a 20-line traceback from the
    CPU allocator; now one line, exit 2, from the estimate against this machine's memory."""
    out = tmp_path / "run"
    r = cli("train", "--data", text_file, "--out", out, "--n-embd", 65536, "--n-head", 1, "--n-layer", 1,
            process=True, timeout=120)
    assert_one_line_error(r, "this model needs about", "GiB available", "--n-embd")
    assert not out.exists()


def test_model_too_big_is_refused_with_figures_and_fix(capsys, monkeypatch, text_file, tmp_path):
    monkeypatch.setattr(resources, "available_memory", lambda device: 8 * resources.GiB)
    monkeypatch.setattr(tinygpt.train, "build_model", lambda cfg: pytest.fail("the model was built"))
    common = ["--data", text_file, "--out", tmp_path / "run", "--device", "cpu", "--dtype", "float32"]

    # Weights dominate: only a smaller model helps, whatever the batch.
    r = cli("train", *common, "--n-embd", 8192, "--n-head", 8, "--n-layer", 7, "--batch-size", 1)
    est = resources.training_memory(C.build(C.ModelConfig, {"n_embd": 8192, "n_head": 8, "n_layer": 7,
                                                            "vocab_size": 34}), 1)
    assert_one_line_error(r, f"this model needs about {est.total / resources.GiB:.1f} GiB to train "
                          f"({est.weights / resources.GiB:.1f} GiB of weights, "
                          f"{est.optimizer / resources.GiB:.1f} of AdamW state and",
                          "but cpu has 8.0 GiB available; use a smaller --n-embd or --n-layer")
    assert "--batch-size" not in r.err

    # A batch's activations dominate: the micro-batch cut that fits, the effective batch kept.
    r = cli("train", *common, "--batch-size", 4096, "--block-size", 128, "--grad-accum", 2)
    assert_one_line_error(r, "of activations for batch 4096 x block 128 in float32",
                          "(the same effective batch in smaller micro-batches), or a smaller --n-embd")
    batch, accum = map(int, re.search(r"use --batch-size (\d+) --grad-accum (\d+)", r.err).groups())
    assert batch * accum == 4096 * 2
    m = C.build(C.ModelConfig, {"block_size": 128, "vocab_size": 34})
    fits = resources.training_memory(m, batch).total <= 8 * resources.GiB
    assert fits and resources.training_memory(m, 2 * batch).total > 8 * resources.GiB  # the largest that fits
    assert not (tmp_path / "run").exists()


def test_model_that_fits_is_not_refused(capsys, monkeypatch, text_file, tmp_path):
    """The same check lets a model through when the machine reports enough memory for it."""
    m = C.build(C.ModelConfig, {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 34})
    need = resources.training_memory(m, 8).total
    monkeypatch.setattr(resources, "available_memory", lambda device: need + 1)
    r = cli("train", "--data", text_file, "--out", tmp_path / "a", *RUN, "--max-iters", 0)
    assert r.code == 0, r.err
    monkeypatch.setattr(resources, "available_memory", lambda device: need - 1)
    r = cli("train", "--data", text_file, "--out", tmp_path / "b", *RUN, "--max-iters", 0)
    assert_one_line_error(r, "this model needs about")


# --- allocation failures --------------------------------------------------------------------------


def cpu_allocator_failure():
    torch.empty(2**61, dtype=torch.uint8)  # refused by malloc at once: nothing is allocated


def cuda_allocator_failure():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                 "of 79.10 GiB of which 1.06 GiB is free.")


def python_memory_error():
    raise MemoryError()


ALLOCATORS = {"cpu": cpu_allocator_failure, "cuda": cuda_allocator_failure, "python": python_memory_error}


def test_allocation_failures_are_told_from_bugs():
    for fail in ALLOCATORS.values():
        with pytest.raises(Exception) as caught:
            fail()
        assert resources.is_out_of_memory(caught.value), caught.value
    assert resources.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"))
    assert resources.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"), ValueError("memory"),
                resources.OutOfMemory("out of memory in training step 3")):
        assert not resources.is_out_of_memory(bug)


def fail_forward(monkeypatch, when, allocator=cpu_allocator_failure) -> list:
    """Make the model's forward pass run out of memory on the calls `when(model, idx)` picks."""
    real = GPTLanguageModel.forward
    failed = []

    def forward(self, idx, *args, **kwargs):
        if when(self, idx):
            failed.append(idx.shape)
            allocator()
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPTLanguageModel, "forward", forward)
    return failed


def calls(n: int):
    """A `when` that is true from its n-th call on."""
    count = [0]

    def when(model, idx):
        count[0] += 1
        return count[0] >= n

    return when


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_out_of_memory_in_a_training_step_resumes_with_a_smaller_batch(capsys, monkeypatch, text_file, tmp_path,
                                                                       allocator):
    out = tmp_path / "run"
    saves = []
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: saves.append(snapshot(out)) or real_save(*a, **k))
    # Training forwards are the ones on a whole batch of 8 in train mode (the timing probe uses 4
    # rows); the fourth is step 3's, after the checkpoint of step 2.
    trains = calls(4)
    failed = fail_forward(monkeypatch, lambda m, idx: m.training and idx.shape[0] == 8 and trains(m, idx),
                          ALLOCATORS[allocator])
    r = cli("train", "--data", text_file, "--out", out, *RUN)
    assert failed == [(8, 16)]
    fix = f"`tinygpt train --resume {out} --batch-size 4 --grad-accum 2`"
    assert_one_line_error(r, "out of memory on cpu in training step 3 (batch 8 x block 16, float32)",
                          f"the last checkpoint (step 2) in {out} is intact: resume with {fix}",
                          "(the same effective batch)", status=4)
    assert len(saves) == 2 and latest_step(out) == 2 and temp_names(out) == []
    monkeypatch.undo()

    r = cli(*fix.strip("`").split()[1:])  # the command the message gives
    assert r.code == 0, r.err
    assert f"resuming {out} at step 2" in r.err
    assert sorted(losses_by_step(out)) == [0, 2, 4, 6] and latest_step(out) == 6
    meta = json.loads((out / "run.json").read_text())
    assert (meta["train"]["batch_size"], meta["train"]["grad_accum"]) == (8, 1)  # the run is still the run


def test_out_of_memory_in_the_loss_estimate(capsys, monkeypatch, text_file, tmp_path):
    out = tmp_path / "run"
    evals = calls(9)  # 2 splits x 2 batches a report: the 9th eval forward is step 4's report
    fail_forward(monkeypatch, lambda m, idx: not m.training and evals(m, idx))
    r = cli("train", "--data", text_file, "--out", out, *RUN)
    assert_one_line_error(r, "out of memory on cpu in the step 4 loss estimate (batch 8 x block 16",
                          f"the last checkpoint (step 2) in {out} is intact", status=4)
    monkeypatch.undo()
    r = cli("train", "--resume", out, "--batch-size", 2, "--grad-accum", 4)
    assert r.code == 0, r.err
    assert sorted(losses_by_step(out)) == [0, 2, 4, 6]


def test_out_of_memory_before_the_first_checkpoint(capsys, monkeypatch, text_file, tmp_path):
    out = tmp_path / "run"
    fail_forward(monkeypatch, lambda m, idx: not m.training)  # step 0's report
    r = cli("train", "--data", text_file, "--out", out, *RUN)
    assert_one_line_error(r, "in the step 0 loss estimate", "no checkpoint was saved yet: run the "
                          "command again with --overwrite --batch-size 4 --grad-accum 2", status=4)


def test_out_of_memory_building_the_model(capsys, monkeypatch, text_file, tmp_path):
    monkeypatch.setattr(tinygpt.train, "build_model", lambda cfg: cpu_allocator_failure())
    r = cli("train", "--data", text_file, "--out", tmp_path / "run", *RUN)
    assert_one_line_error(r, "out of memory on cpu in building the model", "parameters)",
                          "train a smaller model (--n-embd, --n-layer)", status=4)
    assert not (tmp_path / "run").exists()


def test_out_of_memory_in_the_final_evaluation(capsys, monkeypatch, text_file, tmp_path):
    out = tmp_path / "run"
    fail_forward(monkeypatch, lambda m, idx: not m.training and idx.shape[0] != 8)  # not the reports' batches
    r = cli("train", "--data", text_file, "--out", out, *RUN, "--final-eval")
    # The final eval reads 16384 tokens a batch: 1024 windows of 16, a quarter of that suggested.
    assert_one_line_error(r, "in the final evaluation (batch 1024 x block 16, float32)",
                          f"the run is complete and saved in {out}", f"tinygpt eval --ckpt {out} --batch-size 256",
                          status=4)
    assert latest_step(out) == 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    (tmp / "tiny.txt").write_text(TINY_TEXT, encoding="utf-8")
    from tinygpt.cli import main

    assert main(["train", "--data", str(tmp / "tiny.txt"), "--out", str(tmp / "run"), *map(str, RUN)]) == 0
    return tmp / "run"


@pytest.mark.parametrize("command, message", [
    (["eval", "--batch-size", 16, "--dtype", "float32"],
     "out of memory on cpu evaluating the val split (batch 16 x block 16, float32); use a smaller --batch-size"),
    (["sample", "--num-samples", 3, "--max-new-tokens", 5], "out of memory on cpu sampling 3 sample(s) at once "
                                                            "(batch 3 x block 16, float32); use a smaller "
                                                            "--num-samples"),
], ids=["eval", "sample"])
def test_out_of_memory_in_eval_and_sample(capsys, monkeypatch, trained, command, message):
    before = snapshot(trained)
    fail_forward(monkeypatch, lambda m, idx: True)
    r = cli(command[0], "--ckpt", trained, *command[1:])
    after_which = Result(r.code, r.out, r.err.split("\n", 1)[1])  # after "using the best checkpoint: ..."
    assert_one_line_error(after_which, message, status=4)
    assert snapshot(trained) == before


def test_out_of_memory_in_bench(capsys, monkeypatch, tmp_path):
    import tinygpt.bench

    monkeypatch.setattr(tinygpt.bench, "peak_matmul_flops", lambda *a, **k: 1e12)
    fail_forward(monkeypatch, lambda m, idx: True)
    r = cli("bench", "--preset", "cpu-quick", "--vocab-size", 65, "--skip-plain",
                       "--device", "cpu", "--json", tmp_path / "bench.json")
    assert_one_line_error(r, "out of memory on cpu timing the fast training path (batch", status=4)
    assert not (tmp_path / "bench.json").exists()


def test_the_guard_drops_the_failed_step(monkeypatch):
    """What a server relies on: the error it catches holds no reference to the failed work."""
    import gc
    import weakref

    class Work:
        pass

    def step():
        work = Work()
        ref.append(weakref.ref(work))
        cpu_allocator_failure()

    ref = []
    with pytest.raises(resources.OutOfMemory) as caught:
        with resources.memory_guard("out of memory in a request"):
            step()
    assert caught.value.exit_code == 4 and caught.value.__suppress_context__
    gc.collect()
    assert ref[0]() is None


# --- out of disk --------------------------------------------------------------------------------


def full_disk_on(monkeypatch, name: str, code: int = errno.ENOSPC) -> dict:
    """From `armed["on"]` being set, the next write to a file whose name contains `name` writes
    half of its bytes and fails with `code`, as a filling disk does."""
    armed = {"on": False, "fired": set()}

    def fire(path: str) -> bool:
        if armed["on"] and name in os.path.basename(path):
            armed["fired"].add(path)
            return True
        return False

    real_write = os.write

    def write(fd, data):
        if fire(os.readlink(f"/proc/self/fd/{fd}")):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    real_save_file = ckpt.save_file

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        if fire(filename):
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(ckpt, "save_file", save_file)
    return armed


def before_each(monkeypatch, module, name: str, out: Path, armed: dict, arm_at: int) -> list:
    """Snapshot the run directory before each call of `module.name`; arm the fault at call `arm_at`."""
    real = getattr(module, name)
    snapshots = []

    def wrapper(*args, **kwargs):
        snapshots.append(snapshot(out))
        armed["on"] = len(snapshots) >= arm_at
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return snapshots


# (file, errno, the write that fails): the third checkpoint or report is step 4's.
DISK_FAULTS = {
    "weights": ("model.safetensors", errno.ENOSPC, "out of disk space writing"),
    "optimizer state": ("optimizer.pt", errno.ENOSPC, "out of disk space writing"),
    "state.json": ("state.json", errno.EROFS, "cannot write"),
    "latest pointer": (".latest.json.tmp", errno.ENOSPC, "out of disk space writing"),
    "best pointer": (".best.json.tmp", errno.EDQUOT, "disk quota or file size limit reached writing"),
    "metrics": ("metrics.jsonl", errno.ENOSPC, "out of disk space writing"),
}


@pytest.mark.parametrize("case", DISK_FAULTS)
def test_out_of_disk_at_each_write_keeps_the_run_as_it_was(capsys, monkeypatch, text_file, tmp_path, case):
    name, code, what = DISK_FAULTS[case]
    out = tmp_path / "run"
    armed = full_disk_on(monkeypatch, name, code)
    module, function = (runs, "append_report") if name == "metrics.jsonl" else (ckpt, "save_checkpoint")
    snapshots = before_each(monkeypatch, module, function, out, armed, arm_at=3)
    r = cli("train", "--data", text_file, "--out", out, *RUN)
    assert len(armed["fired"]) == 1, armed["fired"]  # the write happened, to one file
    assert_one_line_error(r, f"{what} {out}", f"{name.strip('.').removesuffix('.tmp')}", "at step 4;",
                          "the last checkpoint (step 2) is intact", f"tinygpt train --resume {out}", status=4)
    assert snapshot(out) == snapshots[-1]  # the run directory as it was before the failed write
    assert latest_step(out) == 2 and temp_names(out) == []
    monkeypatch.undo()

    r = cli("train", "--resume", out)
    assert r.code == 0, r.err
    assert sorted(losses_by_step(out)) == [0, 2, 4, 6] and latest_step(out) == 6


def test_out_of_disk_at_the_first_checkpoint(capsys, monkeypatch, text_file, tmp_path):
    """Nothing to resume yet: the message says to run the command again, which then works."""
    out = tmp_path / "run"
    armed = full_disk_on(monkeypatch, "optimizer.pt")
    snapshots = before_each(monkeypatch, ckpt, "save_checkpoint", out, armed, arm_at=1)
    r = cli("train", "--data", text_file, "--out", out, *RUN)
    assert_one_line_error(r, "out of disk space writing", "optimizer.pt at step 0; training stopped before "
                          "its first checkpoint", "run the command again with --overwrite", status=4)
    assert snapshot(out) == snapshots[-1] and temp_names(out) == []
    assert not (out / "checkpoints").exists() and not (out / "latest.json").exists()
    monkeypatch.undo()
    r = cli("train", "--data", text_file, "--out", out, *RUN, "--overwrite")
    assert r.code == 0, r.err
    assert sorted(losses_by_step(out)) == [0, 2, 4, 6]


def test_out_of_disk_starting_or_resuming_a_run(capsys, monkeypatch, text_file, tmp_path):
    out = tmp_path / "run"
    armed = full_disk_on(monkeypatch, "tokenizer.json")
    armed["on"] = True
    r = cli("train", "--data", text_file, "--out", out, *RUN)
    assert_one_line_error(r, f"out of disk space writing {out / '.tokenizer.json.tmp'} while starting the "
                          "run; free some space or choose another --out", status=4)
    assert list(out.iterdir()) == []  # no half run directory that a second try would refuse
    monkeypatch.undo()

    r = cli("train", "--data", text_file, "--out", out, *RUN, "--max-iters", 2)
    assert r.code == 0, r.err
    before = snapshot(out)
    armed = full_disk_on(monkeypatch, ".metrics.jsonl.tmp")  # the resume rewrites metrics.jsonl first
    armed["on"] = True
    r = cli("train", "--resume", out, "--max-iters", 4)
    assert_one_line_error(r, "while resuming", "could not be rewritten (it is unchanged)", status=4)
    assert snapshot(out) == before and temp_names(out) == []


def test_out_of_disk_writing_the_plot(capsys, monkeypatch, text_file, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--data", text_file, "--out", out, *RUN, "--max-iters", 2, "--plot")
    assert r.code == 0, r.err
    old_png = (out / "loss.png").read_bytes()
    armed = full_disk_on(monkeypatch, "loss.png")
    snapshots = before_each(monkeypatch, tinygpt.plot, "plot_runs", out, armed, arm_at=1)
    r = cli("train", "--resume", out, "--max-iters", 4)
    assert len(armed["fired"]) == 1
    assert_one_line_error(r, f"out of disk space writing {out / '.loss.png.tmp'}", "the plot was not "
                          "written and nothing half-written is left", status=4, notices=(f"resuming {out} at step 2",))
    assert snapshot(out) == snapshots[-1] and (out / "loss.png").read_bytes() == old_png
    assert temp_names(out) == [] and latest_step(out) == 4


def test_metrics_append_never_leaves_half_a_line(monkeypatch, tmp_path):
    path = tmp_path / "metrics.jsonl"
    runs.write_json_line(path, {"step": 0})
    armed = full_disk_on(monkeypatch, "metrics.jsonl")
    armed["on"] = True
    with pytest.raises(OSError) as caught:
        runs.write_json_line(path, {"step": 1, "val_loss": 1.5})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == '{"step": 0}\n'
    with pytest.raises(OSError):
        runs.write_json_line(tmp_path / "new-metrics.jsonl", {"step": 0})
    assert not (tmp_path / "new-metrics.jsonl").exists()  # a file that was not there is not left


def read_only(monkeypatch, run_dir: Path) -> None:
    """Opening any file under `run_dir` for writing fails as on a read-only filesystem (as root,
    chmod does not stop writes, so the refusal is simulated where the kernel makes it)."""
    real_open = os.open
    inside = str(run_dir.resolve())

    def guarded(path, flags, *args, **kwargs):
        if str(Path(path).resolve()).startswith(inside) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def test_read_only_run_directory_is_refused(capsys, monkeypatch, trained, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    before = snapshot(run)
    read_only(monkeypatch, run)
    r = cli("train", "--resume", run, "--max-iters", 8)
    assert_one_line_error(r, f"run directory {run} is not writable (Read-only file system)",
                          "make it writable (or copy it elsewhere), then resume", status=4)
    monkeypatch.undo()
    assert snapshot(run) == before


def mount_or_skip(*args) -> None:
    r = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount here ({r.stderr.strip() or r.returncode}); the simulated tests cover this")


def test_read_only_mount_is_refused(capsys, trained, tmp_path):
    """The kernel's own refusal: a read-only bind mount of a run (or chmod, when not root)."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    view = tmp_path / "ro"
    if os.geteuid() != 0:
        run.chmod(0o555)
        view = run
    else:
        view.mkdir()
        mount_or_skip("--bind", run, view)
    try:
        if os.geteuid() == 0:
            mount_or_skip("-o", "remount,ro,bind", view)
        before = snapshot(run)
        r = cli("train", "--resume", view, "--max-iters", 8)
        assert_one_line_error(r, f"run directory {view} is not writable", status=4)
        assert snapshot(run) == before
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(view)], capture_output=True)
        else:
            run.chmod(0o755)


def test_a_real_full_disk_during_a_checkpoint(capsys, monkeypatch, text_file, tmp_path):
    """A 2 MiB tmpfs, filled up by another file until a checkpoint no longer fits."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_or_skip("-t", "tmpfs", "-o", "size=2m", "tmpfs", disk)
    try:
        out = disk / "run"
        r = cli("train", "--data", text_file, "--out", out, *RUN, "--max-iters", 2)
        assert r.code == 0, r.err
        one_checkpoint = sum(p.stat().st_size for p in checkpoint_dir(out).iterdir())
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave room for the metrics line, not for the weights
            f.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - one_checkpoint // 4))
        snapshots = before_each(monkeypatch, ckpt, "save_checkpoint", out, {}, arm_at=1)
        r = cli("train", "--resume", out, "--max-iters", 4)
        assert_one_line_error(r, f"out of disk space writing {out / 'checkpoints'}", "at step 4;",
                              "the last checkpoint (step 2) is intact", status=4,
                              notices=(f"resuming {out} at step 2",))
        assert snapshot(out) == snapshots[-1] and temp_names(out) == []
        monkeypatch.undo()
        filler.unlink()
        r = cli("train", "--resume", out, "--max-iters", 4)
        assert r.code == 0, r.err
        assert sorted(losses_by_step(out)) == [0, 2, 4] and latest_step(out) == 4
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
