"""Settings: layering (defaults < preset < config file < flags), presets, config files, values
refused with a message that names the field, and `--help` listing every field."""

import json

import pytest
from conftest import assert_one_line_error, cli, tiny_args
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt import config as C
from tinygpt.errors import UserError
from tinygpt.runs import read_metrics

# --- layering, presets and config files -------------------------------------------------------------


def test_config_file_layers_under_flags_over_preset(tmp_path):
    presets = C.list_presets()
    assert presets, "tinygpt ships presets in tinygpt/presets/*.toml"
    name = next(iter(presets))
    cfg = tmp_path / "my.toml"
    cfg.write_text('n-layer = 3\nn_head = 3\nn_embd = 48\nlearning_rate = 2e-3\nseed = 4242\nmax_iters = 11\n'
                   'tokenizer = "bpe"\n')
    m, t = C.resolve_train_settings({"preset": name, "config": str(cfg), "max_iters": 7})
    assert (m.n_layer, m.n_head, m.n_embd, t.learning_rate, t.seed, t.tokenizer) == (3, 3, 48, 2e-3, 4242, "bpe")
    assert t.max_iters == 7  # the flag beats the file
    preset = C.load_preset(name)
    resolved = {**C.to_dict(m), **C.to_dict(t)}
    for key, value in preset.items():
        if key not in {"n_layer", "n_head", "n_embd", "learning_rate", "seed", "max_iters", "tokenizer"}:
            assert resolved[key] == value, key  # the file did not touch what it does not name


def test_every_preset_is_listed_and_valid():
    presets = C.list_presets()
    r = cli("presets")
    assert r.code == 0, r.err
    assert [ln.split()[0] for ln in r.out.splitlines()] == [*presets, "auto"]  # auto: planned, not a file
    for name, description in presets.items():
        assert description, f"preset {name} has no description"
        m, t = C.resolve_train_settings({"preset": name})
        values = {**C.to_dict(m), **C.to_dict(t)}
        assert all(values[k] == v for k, v in C.load_preset(name).items())


def test_config_file_applies_in_a_real_run_and_bad_files_are_one_line_errors(tiny_text_file, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\nbatch_size = 8\nmax_iters = 6\n"
                    "eval_interval = 3\neval_iters = 2\nsample_chars = 0\ndtype = 'float32'\nlearning_rate = 0.002\n"
                    "plot = false\n")
    r = cli("train", "--config", good, "--data", tiny_text_file, "--out", tmp_path / "run", "--max-iters", 3)
    assert r.code == 0, r.err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["model"]["n_layer"], run["model"]["n_embd"], run["train"]["learning_rate"]) == (1, 16, 0.002)
    rows = read_metrics(tmp_path / "run", reports_only=False)
    assert run["train"]["max_iters"] == 3 and [x["step"] for x in rows][-2:] == [3, 3]

    typo = tmp_path / "typo.toml"
    typo.write_text("n_layer = 2\nlearning_rat = 0.1\n")
    assert_one_line_error(cli("train", "--config", typo), "unknown key 'learning_rat'", str(typo))
    broken = tmp_path / "broken.toml"
    broken.write_text("n_layer = = 2\n")
    assert_one_line_error(cli("train", "--config", broken), "not valid TOML", str(broken))
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("n_layer = 'two'\n")
    assert_one_line_error(cli("train", "--config", wrong_type), "n_layer must be int")
    assert_one_line_error(cli("train", "--config", tmp_path / "missing.toml"), "does not exist")


def help_blocks(text: str) -> dict[str, str]:
    """`--help` output as {flag name without dashes: its help, on one line}."""
    blocks = {}
    for block in ("\n" + text).split("\n  --")[1:]:
        blocks[block.split()[0].rstrip(",")] = " ".join(block.split())
    return blocks


def test_help_shows_every_field_with_its_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    blocks = help_blocks(cli("train", "--help").out)
    for cls in (C.ModelConfig, C.TrainConfig):
        for f in C.cli_fields(cls):
            flag = f.name.replace("_", "-")
            assert flag in blocks, f"--{flag} missing from train --help"
            assert f.metadata["help"].split()[0] in blocks[flag]
            shown = "(default:" if "(default:" in f.metadata["help"] else f"(default: {f.default!r}"
            assert shown in blocks[flag], blocks[flag]
            assert blocks[flag].count("(default:") == 1, blocks[flag]
    assert "config" in blocks and "preset" in blocks
    assert "(default: Tiny Shakespeare" in blocks["data"] and "(default: None)" not in blocks["data"]


def test_dropout_help_names_what_it_drops():
    dropout = help_blocks(cli("train", "--help").out)["dropout"]
    assert "attention and feed-forward" in dropout
    assert "embedding" not in dropout  # there is no embedding dropout


# --- values refused, naming the field ------------------------------------------------------------------

BAD_TRAIN_FLAGS = [
    (["--n-embd", 30, "--n-head", 4], "n_embd (30) must be divisible by n_head (4)"),
    (["--n-layer", 0], "n_layer must be > 0, got 0"),
    (["--block-size", -8], "block_size must be > 0, got -8"),
    (["--n-head", 0], "n_head must be > 0, got 0"),
    (["--batch-size", 0], "batch_size must be > 0, got 0"),
    (["--max-iters", -1], "max_iters must be >= 0, got -1"),
    (["--learning-rate", 0], "learning_rate must be > 0, got 0.0"),
    (["--learning-rate", -3e-4], "learning_rate must be > 0, got -0.0003"),
    (["--learning-rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--dropout", 1], "dropout must be in [0, 1), got 1.0"),
    (["--dropout", -0.1], "dropout must be in [0, 1), got -0.1"),
    (["--attn-dropout", 1.5], "attn_dropout must be in [0, 1), got 1.5"),
    (["--n-embd", "x"], "argument --n-embd: invalid int value: 'x'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAIN_FLAGS, ids=[m for _, m in BAD_TRAIN_FLAGS])
def test_bad_hyperparameter(tiny_text_file, tmp_path, flags, message):
    r = cli("train", *tiny_args(tiny_text_file, tmp_path / "run"), *flags)
    assert_one_line_error(r, message)
    assert not (tmp_path / "run").exists()


BAD_SAMPLE_FLAGS = [
    (["--top-p", 0], "top_p must be in (0, 1], got 0.0"),
    (["--top-p", 1.5], "top_p must be in (0, 1], got 1.5"),
    (["--temperature", -1], "temperature must be >= 0, got -1.0"),
    (["--temperature", "inf"], "temperature must be a finite number, got inf"),
    (["--top-k", 0], "top_k must be >= 1, got 0"),
    (["--max-new-tokens", -5], "max_new_tokens must be >= 0, got -5"),
]


@pytest.mark.parametrize("flags, message", BAD_SAMPLE_FLAGS, ids=[m for _, m in BAD_SAMPLE_FLAGS])
def test_bad_sampling_argument(trained_run, flags, message):
    r = cli("sample", "--ckpt", trained_run, *flags)
    assert_one_line_error(r, message)
    assert r.out == ""


NUMBERS = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.none(), st.booleans(), st.text(max_size=2))
FIELDS = sorted({f.name for cls in (C.ModelConfig, C.TrainConfig, C.SampleConfig) for f in C.cli_fields(cls)}
                - {"data", "out", "resume", "init_from", "prompt"})


@given(st.dictionaries(st.sampled_from(FIELDS), NUMBERS, max_size=6))
@settings(max_examples=300, deadline=None)
def test_config_validation_only_ever_raises_user_error(values):
    """Any value for any setting is accepted as valid or refused with a UserError (a one-line
    message at the CLI), never another exception; what is accepted is finite and in range."""
    for cls in (C.ModelConfig, C.TrainConfig, C.SampleConfig):
        try:
            cfg = C.build(cls, values)
        except UserError as e:
            assert str(e) and "\n" not in str(e)
            continue
        for name, value in C.to_dict(cfg).items():
            if isinstance(value, float):
                assert value == value and abs(value) != float("inf"), name
        if cls is C.ModelConfig:
            assert cfg.n_embd % cfg.n_head == 0 and 0 <= cfg.dropout < 1
        if cls is C.TrainConfig:
            assert cfg.learning_rate > 0 and cfg.batch_size > 0
        if cls is C.SampleConfig:
            assert cfg.temperature >= 0 and (cfg.top_p is None or 0 < cfg.top_p <= 1)
