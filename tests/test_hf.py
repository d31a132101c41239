"""Issue 10: export runs to Hugging Face transformers; fine-tune GPT-2-family checkpoints.

Offline: every GPT-2 here is a tiny random one built with transformers and saved locally, and
its tokenizer is trained with the `tokenizers` library on the tiny text.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, RunsCode, assert_one_line_error, cli, shakespeare_path, tiny_configs
from safetensors.torch import load_file

from tinygpt.checkpoint import load_run
from tinygpt.data import split
from tinygpt.hf import fold_head_bias, load_gpt2
from tinygpt.tokenizer import CharTokenizer
from tinygpt.train import train

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # no warnings about a missing pad token in generate

QUIET = dict(log=lambda *_: None)
TOL = 1e-4  # float32 logits, tinygpt vs transformers


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


# The exported runs: char runs with the lecture's head bias (folded on export; 34 characters fit
# n_embd 64), one of them tied and with GELU; a BPE run with GPT-2's biases and GELU instead.
RUNS = {
    "char-relu": dict(n_embd=64),
    "char-gelu-tied": dict(n_embd=64, activation="gelu", tie_embeddings=True),
    "bpe": dict(tokenizer="bpe", vocab_size=280, activation="gelu_tanh", attn_bias=True, head_bias=False),
}


@pytest.fixture(scope="module")
def runs(text_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, settings in RUNS.items():
        m, t = tiny_configs(text_file, root / name, max_iters=40, **settings)
        out[name] = train(m, t, **QUIET).run_dir
    return out


def export(run: Path, out: Path) -> Path:
    r = cli("export", run, "--to", "hf", "--out", out)
    assert r.code == 0, r.err
    return out


def load_hf(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(directory)


def val_windows(tokenizer, block_size: int, n: int = 6) -> torch.Tensor:
    """`n` windows of `block_size` tokens spread over the val split."""
    _, val_text = split(TINY_TEXT)
    ids = torch.tensor(tokenizer.encode(val_text))
    starts = torch.linspace(0, len(ids) - block_size, n).long()
    return torch.stack([ids[s : s + block_size] for s in starts])


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert ours.std() > 0.3  # not a model whose logits are all near zero, where any mapping agrees
    assert (ours - theirs).abs().max() < TOL


# --- export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RUNS)
def test_export_computes_the_runs_logits_and_tokens(name, runs, tmp_path):
    run = runs[name]
    out = export(run, tmp_path / "hf")
    ours, tok = load_run(run)
    theirs, hf_tok = load_hf(out)
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    x = val_windows(tok, ours.config.block_size)
    with torch.no_grad():
        assert_same_logits(ours(x)[0], theirs(x).logits)

    _, val_text = split(TINY_TEXT)
    assert hf_tok.encode(val_text) == tok.encode(val_text)
    assert hf_tok.decode(tok.encode(val_text)) == val_text  # spaces and newlines included

    weights = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == ours.config.tie_embeddings
    assert ("lm_head.weight" in weights) != ours.config.tie_embeddings  # a tied head is stored once
    assert "lm_head.bias" not in weights


def test_head_bias_is_folded_into_ln_f(runs, tmp_path):
    run = runs["char-relu"]
    out = export(run, tmp_path / "hf")
    ours, _ = load_run(run)
    exported = load_file(str(out / "model.safetensors"))["transformer.ln_f.bias"]
    d = exported - ours.ln_f.bias.detach()
    head = ours.lm_head
    assert head.bias.detach().abs().max() > 1e-2  # training moved the bias: the fold matters
    assert (head.weight.detach() @ d - head.bias.detach()).abs().max() < 1e-5  # W d = b


def test_fold_head_bias_only_where_exact():
    g = torch.Generator().manual_seed(0)
    w, b, beta = torch.randn(5, 8, generator=g), torch.randn(5, generator=g), torch.randn(8, generator=g)
    folded = fold_head_bias(w, b, beta)
    assert torch.allclose(w @ folded, w @ beta + b, atol=1e-5)
    assert "vocab 9 > n_embd 8" in fold_head_bias(torch.randn(9, 8), torch.randn(9), beta)
    same_rows = torch.cat([w, w[:1]])  # two tokens whose logits differ only by their biases
    assert "rank is 5 < vocab 6" in fold_head_bias(same_rows, torch.randn(6), beta)
    b_same = torch.cat([b, b[:1]])  # ...unless their biases are equal too
    assert torch.allclose(same_rows @ fold_head_bias(same_rows, b_same, beta), same_rows @ beta + b_same, atol=1e-5)


@pytest.mark.parametrize("name", ["char-gelu-tied", "bpe"])
def test_greedy_generate_equals_tinygpt_sample_at_temperature_0(name, runs, tmp_path):
    run = runs[name]
    out = export(run, tmp_path / "hf")
    theirs, hf_tok = load_hf(out)
    prompt = "First Citizen"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    new = 16 - ids.shape[1]  # prompt + new tokens fill the block exactly
    generated = theirs.generate(ids, max_new_tokens=new, do_sample=False)
    r = cli("sample", "--ckpt", run, "--prompt", prompt, "--max-new-tokens", new, "--temperature", 0,
                "--dtype", "float32", "--device", "cpu")
    assert r.code == 0, r.err
    assert r.out == hf_tok.decode(generated[0]) + "\n"


def test_export_refusals_are_one_line_and_write_nothing(text_file, tmp_path):
    def run_of(name, **settings):
        m, t = tiny_configs(text_file, tmp_path / name, max_iters=0, **settings)
        return train(m, t, **QUIET).run_dir

    cases = [
        (run_of("bigram", model="bigram"), ["is a bigram model", "only GPT runs"]),
        (run_of("modern", pos_emb="rope", norm="rmsnorm", activation="relu2", qk_norm=True),
         ["pos_emb='rope'", "norm='rmsnorm'", "qk_norm=True", "activation='relu2'"]),
        (run_of("wide-vocab", tokenizer="bpe", vocab_size=280),
         ["cannot be folded", "vocab 280 > n_embd 32", "--no-head-bias"]),
    ]
    for run, fragments in cases:
        assert_one_line_error(cli("export", run, "--to", "hf", "--out", tmp_path / "hf"), *fragments)
        assert not (tmp_path / "hf").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    good = run_of("good", head_bias=False)
    assert_one_line_error(cli("export", good, "--out", taken), "not empty")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    (taken / "notes.txt").unlink()
    export(good, taken)  # an empty directory is fine
    assert_one_line_error(cli("export", tmp_path / "nowhere", "--out", tmp_path / "x"), "does not exist")


def test_exported_char_model_imports_back_with_its_char_tokenizer(runs, tmp_path):
    run = runs["char-gelu-tied"]
    out = export(run, tmp_path / "hf")
    ours, tok = load_run(run)
    back, back_tok = load_gpt2(out)
    assert isinstance(back_tok, CharTokenizer) and back_tok.chars == tok.chars
    x = val_windows(tok, ours.config.block_size)
    with torch.no_grad():
        assert_same_logits(back(x)[0], ours(x)[0])


# --- import ----------------------------------------------------------------------------------------


def save_tiny_gpt2(directory: Path, tie: bool = True, activation: str = "gelu_new") -> Path:
    """A random GPT-2 (2 layers, 32 wide, 32 positions) and a byte-level BPE tokenizer, saved as
    `save_pretrained` does. Every weight is randomised, LayerNorms and biases included, so a
    tensor put in the wrong place would change the logits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf_tok.save_pretrained(directory)

    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, activation_function=activation, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def hf_logits(directory: Path, x: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("tie, activation", [(True, "gelu_new"), (False, "relu")])
def test_import_computes_the_gpt2_logits(tie, activation, tmp_path):
    directory = save_tiny_gpt2(tmp_path / "gpt2", tie, activation)
    model, tok = load_gpt2(directory)
    c = model.config
    assert (c.attn_bias, c.head_bias, c.tie_embeddings, c.block_size) == (True, False, tie, 32)
    x = torch.randint(0, c.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_logits(model(x)[0], hf_logits(directory, x))
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    text = TINY_TEXT[:300] + "<|endoftext|>é"
    assert tok.encode(text) == hf_tok.encode(text) and tok.decode(tok.encode(text)) == text


def test_import_reads_pytorch_bin_and_vocab_merges(gpt2_dir, tmp_path):
    """Older checkpoints: weights as a pickle (read weights_only) and GPT-2's vocab.json + merges.txt."""
    from tokenizers import Tokenizer

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(gpt2_dir / "config.json", old)
    # A checkpoint saved from GPT2Model has no `transformer.` prefix; old ones carry attention-mask buffers.
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(gpt2_dir / "model.safetensors")).items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    torch.save(state, old / "pytorch_model.bin")
    Tokenizer.from_file(str(gpt2_dir / "tokenizer.json")).model.save(str(old))  # vocab.json, merges.txt
    model, tok = load_gpt2(old)
    reference, ref_tok = load_gpt2(gpt2_dir)
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x)[0], reference(x)[0])
    text = TINY_TEXT[:300] + "<|endoftext|>"
    assert tok.encode(text) == ref_tok.encode(text)


@pytest.mark.slow
def test_fine_tune_gpt2_then_export_and_load_again(gpt2_dir, text_file, tmp_path):
    data = shakespeare_path() or text_file
    run = tmp_path / "ft"
    common = ["--dtype", "float32", "--device", "cpu", "--sample-chars", 0, "--no-plot", "--quiet"]
    r = cli("train", "--init-from", f"hf:{gpt2_dir}", "--data", data, "--out", run, "--max-iters", 20,
                "--eval-interval", 20, "--eval-iters", 4, "--batch-size", 8, "--block-size", 16,
                "--learning-rate", 1e-3, "--dropout", 0, "--no-final-eval", *common)
    assert r.code == 0, r.err
    reports = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in reports] == [0, 20]
    assert reports[1]["train_loss"] < reports[0]["train_loss"] and reports[1]["val_loss"] < reports[0]["val_loss"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["init_from"] == f"hf:{gpt2_dir.resolve()}"
    assert meta["model"]["block_size"] == 16 and meta["model"]["attn_bias"] and not meta["model"]["head_bias"]

    # A normal run: eval, sample and resume work on it.
    assert cli("eval", "--ckpt", run, "--split", "val", *common[:4]).code == 0
    assert cli("sample", "--ckpt", run, "--max-new-tokens", 5, *common[:4]).code == 0
    r = cli("train", "--resume", run, "--max-iters", 22, *common[4:])
    assert r.code == 0, r.err

    out = export(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["n_positions"] == 16
    ours, tok = load_run(run)
    x = val_windows(tok, 16)
    with torch.no_grad():
        assert_same_logits(ours(x)[0], hf_logits(out, x))


def test_import_errors_are_one_line(gpt2_dir, text_file, tmp_path):
    def copy(name: str, edit: dict | None = None, drop: tuple = ()) -> Path:
        d = tmp_path / name
        shutil.copytree(gpt2_dir, d)
        if edit:
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**config, **edit}))
        for f in drop:
            (d / f).unlink()
        return d

    def init_from(directory, *flags):
        return cli("train", "--init-from", f"hf:{directory}", "--data", text_file, "--out", tmp_path / "run",
                       "--max-iters", 0, "--device", "cpu", *flags)

    assert_one_line_error(init_from(tmp_path / "nowhere"), "no such directory")
    assert_one_line_error(init_from(copy("no-config", drop=("config.json",))), "no config.json")
    assert_one_line_error(init_from(copy("llama", {"model_type": "llama"})), "'llama'", "GPT-2-family")
    assert_one_line_error(init_from(copy("no-tokenizer", drop=("tokenizer.json",))), "no tokenizer")
    assert_one_line_error(init_from(copy("no-weights", drop=("model.safetensors",))), "no weights")
    assert_one_line_error(init_from(copy("wider", {"n_embd": 64})), "wte.weight has shape (300, 32)",
                          "implies (300, 64)")
    assert_one_line_error(init_from(copy("inner", {"n_inner": 96})), "n_inner=96")
    assert_one_line_error(init_from(copy("silu", {"activation_function": "silu"})),
                          "activation_function='silu'")
    assert_one_line_error(init_from(copy("typo", {"n_embd": "32"})), "n_embd must be int")
    assert_one_line_error(init_from(gpt2_dir, "--block-size", 64), "--block-size 64", "n_positions (32)")

    evil = copy("evil", drop=("model.safetensors",))
    marker = tmp_path / "code-ran"
    torch.save({"wte.weight": RunsCode(marker)}, evil / "pytorch_model.bin")
    assert_one_line_error(init_from(evil), "pytorch_model.bin is unreadable or unsafe", "not loaded")
    assert not marker.exists()
    assert_one_line_error(init_from(gpt2_dir, "--n-layer", 3), "--n-layer 3 conflicts")
    assert not (tmp_path / "run").exists()
