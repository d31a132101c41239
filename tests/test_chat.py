"""Issue 26, from model to assistant: conversations in, the template, the loss on the answers
only, `tinygpt chat`, /v1/chat/completions and the template in the Hugging Face export.

The model that must learn something is fine-tuned on synthetic conversations: the user says a
random word, the assistant answers it reversed. The answers are a function of the question, so a
model that learned them scores near zero on them; the questions are random, so a loss on them
cannot fall below their entropy."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, cli, serving, tiny_configs, weights

from tinygpt.chat import (
    ASSISTANT,
    CHAT_TEMPLATE,
    END_OF_TURN,
    SYSTEM,
    USER,
    build_splits,
    chat_ids,
    fit,
    has_chat,
    prompt_ids,
    read_conversations,
    render,
    reply,
)
from tinygpt.checkpoint import load_run
from tinygpt.data import IGNORE
from tinygpt.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from tinygpt.train import train

LETTERS = "abcdefgh"
QUIET = dict(log=lambda *a, **k: None, note=lambda *a, **k: None)


def word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def reversal_chats(path: Path, n: int, seed: int, system: bool = False) -> list[str]:
    """`n` conversations in OpenAI's format: a random word, and its reverse as the answer."""
    rng = random.Random(seed)
    words = [word(rng) for _ in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        for w in words:
            messages = ([{"role": "system", "content": "rev"}] if system else []) + [
                {"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return words


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A base model that has seen the letters (as a pretrained model has seen its language)."""
    root = tmp_path_factory.mktemp("chat-base")
    rng = random.Random(0)
    (root / "words.txt").write_text(" ".join(word(rng) for _ in range(3000)), encoding="utf-8")
    m, t = tiny_configs(root / "words.txt", root / "base", n_embd=64, n_head=4, block_size=24, max_iters=30)
    train(m, t, **QUIET)
    return root / "base"


@pytest.fixture(scope="module")
def chat_run(base_run, tmp_path_factory) -> Path:
    """The base fine-tuned on 600 reversal conversations, the loss on the answers."""
    root = tmp_path_factory.mktemp("chat-ft")
    reversal_chats(root / "chats.jsonl", 600, seed=1)
    m, t = tiny_configs(root / "chats.jsonl", root / "ft", init_from=str(base_run), max_iters=700,
                        eval_interval=350, batch_size=32, learning_rate=3e-3, final_eval=True)
    train(m, t, **QUIET)
    return root / "ft"


def final(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in lines if "final_val_loss" in r)


# --- the template and the rows ------------------------------------------------------------------


def test_the_template_adds_tokens_after_every_old_id_and_renders_roles_content_and_ends():
    base = CharTokenizer.train("hello there, hi")
    from tinygpt.chat import with_chat

    tok = with_chat(base)
    assert tok.chars[: base.vocab_size] == base.chars and tok.chars[base.vocab_size:] == [SYSTEM, USER, ASSISTANT,
                                                                                          END_OF_TURN]
    assert has_chat(tok) and not has_chat(base) and with_chat(tok) is tok
    ids, scored = render([{"role": "system", "content": "hi"}, {"role": "user", "content": "the"},
                          {"role": "assistant", "content": "hello"}], tok, add_generation_prompt=False)
    c = chat_ids(tok)
    assert ids == [c["system"], *tok.encode("hi"), c["end"], c["user"], *tok.encode("the"), c["end"],
                   c["assistant"], *tok.encode("hello"), c["end"]]
    # what --loss-on assistant learns: the answer's characters and its end of turn, nothing else
    assert [t for t, s in zip(ids, scored) if s] == [*tok.encode("hello"), c["end"]]
    assert tok.decode(ids) == "<|system|>hi<|end|><|user|>the<|end|><|assistant|>hello<|end|>"
    # a message that spells a token's name is text: it never becomes the token
    tok2 = with_chat(CharTokenizer.train("<|user>"))
    body = render([{"role": "user", "content": "<|user|>"}], tok2)[0][1:-1]
    assert body == tok2.encode("<|user|>") and chat_ids(tok2)["user"] not in body

    bpe = BPETokenizer.train("hello there, hello again " * 20, 300)
    chat_bpe = with_chat(bpe)
    assert chat_bpe.vocab_size == bpe.vocab_size + 4 and chat_bpe.encode("hello there") == bpe.encode("hello there")
    assert chat_bpe.encode("<|user|>hi") == bpe.encode("<|user|>hi")  # text, not the special token


def test_long_conversations_lose_their_oldest_exchanges_keep_the_system_message_or_are_dropped():
    from tinygpt.chat import with_chat

    tok = with_chat(CharTokenizer.train(LETTERS + " "))
    conv = [{"role": "system", "content": "ab"}] + [
        m for w in ("aaaa", "bbbb", "cccc") for m in ({"role": "user", "content": w},
                                                     {"role": "assistant", "content": w.upper().lower()})]
    whole, _ = render(conv, tok)
    assert fit(conv, tok, len(whole))[0] == whole and fit(conv, tok, len(whole))[2] == 0
    ids, scored, cut = fit(conv, tok, len(whole) - 1)  # one token short: the oldest exchange goes
    assert cut == 1 and ids == render([conv[0]] + conv[3:], tok)[0]
    ids, _, cut = fit(conv, tok, 4 + 6 + 6)  # room for the system message and the last exchange only
    assert cut == 2 and tok.decode(ids) == "<|system|>ab<|end|><|user|>cccc<|end|><|assistant|>cccc<|end|>"
    assert fit(conv, tok, 15) is None  # the last answer does not fit: dropped
    # the prompt for a reply: the newest turn always kept, the oldest cut first
    p = prompt_ids(conv[:-1], tok, 4 + 6 + 1)
    assert tok.decode(p) == "<|system|>ab<|end|><|user|>cccc<|end|><|assistant|>"


def test_rows_hold_one_conversation_each_and_score_only_answers(tmp_path):
    from tinygpt.chat import with_chat

    words = reversal_chats(tmp_path / "c.jsonl", 50, seed=3, system=True)
    convs = read_conversations(tmp_path / "c.jsonl")
    tok = with_chat(CharTokenizer.train(LETTERS + "rv"))
    train_split, val_split, stats = build_splits(convs, tok, 24, "assistant", 0.1)
    c = chat_ids(tok)
    assert (stats.conversations, stats.train, stats.val, stats.cut, stats.dropped) == (50, 45, 5, 0, 0)
    assert len(train_split) + len(val_split) == 50
    for split in (train_split, val_split):
        for row, target in zip(split.rows, split.targets):
            row = row.tolist()
            assert row[0] == c["system"] and row.count(c["user"]) == 1 and row.count(c["assistant"]) == 1
            answer = tok.decode(row[row.index(c["assistant"]) + 1: row.index(c["end"], row.index(c["assistant"]))])
            question = tok.decode(row[row.index(c["user"]) + 1: row.index(c["end"], row.index(c["user"]))])
            assert answer == question[::-1] and question in words
            scored = [t for t in target.tolist() if t != IGNORE]
            assert tok.decode(scored) == answer + END_OF_TURN  # the answer and its end: nothing else
    assert stats.scored == sum(len(w) + 1 for w in words)
    # the same split every time: whole conversations, drawn by a fixed seed
    again = build_splits(convs, tok, 24, "assistant", 0.1)[1]
    assert torch.equal(again.rows, val_split.rows)
    every = build_splits(convs, tok, 24, "all", 0.1)  # --loss-on all: every token after a conversation's first
    assert every[0].scored + every[1].scored == sum(len(render(c, tok)[0]) - 1 for c in convs)


def test_masked_positions_send_no_gradient(chat_run):
    """With --loss-on assistant, the loss's gradient on the logits of every position whose
    target is not an answer's token is exactly zero (and not zero on the others)."""
    from tinygpt.chat import with_chat

    model, tok = load_run(chat_run)
    model.train()
    convs = [[{"role": "user", "content": "abcd"}, {"role": "assistant", "content": "dcba"}]]
    split = build_splits(convs * 2, with_chat(tok), model.config.block_size, "assistant", 0.5)[0]
    x, y = split.batch(torch.arange(1))
    logits, _ = model(x)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    per_position = logits.grad.abs().sum(-1)[0]
    masked = y[0] == IGNORE
    assert masked.sum() > 5 and torch.all(per_position[masked] == 0) and torch.all(per_position[~masked] > 0)


# --- learning -------------------------------------------------------------------------------------


def test_fine_tuning_learns_the_answers_and_answers_new_questions(chat_run, base_run):
    meta = json.loads((chat_run / "run.json").read_text())
    assert meta["train"]["data_format"] == "chat" and meta["chat_template"] == CHAT_TEMPLATE
    assert final(chat_run)["final_val_loss"] < 0.1  # near zero on the answers of held-out conversations
    model, tok = load_run(chat_run)
    base_vocab = load_tokenizer(base_run / "tokenizer.json").vocab_size
    assert tok.vocab_size == base_vocab + 4 and has_chat(tok)
    rng = random.Random(99)
    questions = [word(rng) for _ in range(40)]
    right = sum("".join(reply(model, tok, [{"role": "user", "content": q}], 12, temperature=0)) == q[::-1]
                for q in questions)
    assert right >= 36, f"{right} of 40 held-out questions answered right"


def test_new_tokens_start_as_the_average_token_so_the_first_loss_is_sane(base_run, tmp_path):
    reversal_chats(tmp_path / "c.jsonl", 100, seed=5)
    m, t = tiny_configs(tmp_path / "c.jsonl", tmp_path / "ft0", init_from=str(base_run), max_iters=0,
                        final_eval=True)
    train(m, t, **QUIET)
    old, new = weights(base_run), weights(tmp_path / "ft0")
    n = old["token_embedding_table.weight"].shape[0]
    for name in ("token_embedding_table.weight", "lm_head.bias"):
        assert torch.equal(new[name][:n], old[name])
        assert torch.allclose(new[name][n:], old[name].mean(0, keepdim=True).expand_as(new[name][n:]))
    # before any step: about a uniform guess over the vocabulary, not the many nats a random row costs
    assert final(tmp_path / "ft0")["final_val_loss"] < math.log(n + 4) + 1.0


def test_loss_on_all_reports_the_loss_the_random_questions_force(base_run, tmp_path):
    reversal_chats(tmp_path / "c.jsonl", 300, seed=7)
    m, t = tiny_configs(tmp_path / "c.jsonl", tmp_path / "all", init_from=str(base_run), max_iters=300,
                        eval_interval=300, batch_size=32, learning_rate=3e-3, final_eval=True, loss_on="all")
    train(m, t, **QUIET)
    tok = load_tokenizer(tmp_path / "all" / "tokenizer.json")
    convs = read_conversations(tmp_path / "c.jsonl")
    # The questions' letters are uniform over 8: no model does better than ln 8 on each of them
    share = sum(len(c[0]["content"]) for c in convs) / sum(len(render(c, tok)[0]) - 1 for c in convs)
    assert final(tmp_path / "all")["final_val_loss"] > 0.9 * share * math.log(8)
    assert json.loads((tmp_path / "all" / "run.json").read_text())["train"]["loss_on"] == "all"


def test_resuming_a_fine_tune_mid_way_is_bit_exact(base_run, tmp_path):
    reversal_chats(tmp_path / "c.jsonl", 100, seed=11)
    common = dict(init_from=str(base_run), dropout=0.1, eval_interval=5, batch_size=8)
    m, t = tiny_configs(tmp_path / "c.jsonl", tmp_path / "straight", max_iters=10, **common)
    train(m, t, **QUIET)
    m, t = tiny_configs(tmp_path / "c.jsonl", tmp_path / "split", max_iters=5, **common)
    train(m, t, **QUIET)
    r = cli("train", "--resume", tmp_path / "split", "--max-iters", 10, "--quiet")
    assert r.code == 0, r.err
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- bad data ---------------------------------------------------------------------------------------

BAD = [
    ('{"messages": [{"role": "user", "content": "ab"}', "line 2: not JSON"),
    ('{"text": "ab"}', 'line 2: no "messages" list'),
    ('{"messages": [{"role": "bot", "content": "ab"}, {"role": "assistant", "content": "ba"}]}',
     "line 2, message 1: unknown role 'bot'; the roles are system, user and assistant"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "ba"}]}',
     "line 2, message 1 (user): empty content"),
    ('{"messages": [{"role": "user", "content": "ab"}]}', "line 2: no assistant turn"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_conversations_are_one_line_naming_the_line(base_run, tmp_path, line, message):
    data = tmp_path / "c.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]})
    data.write_text(good + "\n" + line + "\n", encoding="utf-8")
    r = cli("train", "--init-from", base_run, "--data", data, "--out", tmp_path / "out")
    assert_one_line_error(r, str(data), message)
    assert not (tmp_path / "out").exists()


def test_auto_is_for_text_and_says_what_conversations_need(tmp_path):
    reversal_chats(tmp_path / "c.jsonl", 20, seed=1)
    r = cli("train", "--data", tmp_path / "c.jsonl", "--preset", "auto", "--out", tmp_path / "out")
    assert_one_line_error(r, "--preset auto sizes a model for text", "--init-from RUN")
    assert not (tmp_path / "out").exists()


def test_characters_the_base_lacks_follow_the_grow_vocab_rule(base_run, tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "xyz"},
                                             {"role": "assistant", "content": "zyx"}]}) + "\n", encoding="utf-8")
    r = cli("train", "--init-from", base_run, "--data", data, "--out", tmp_path / "out")
    assert_one_line_error(r, "3 character(s)", "'x'", "--grow-vocab")


# --- tinygpt chat, the API, the export -------------------------------------------------------------


def test_tinygpt_chat_piped_answers_each_line_and_resets(chat_run):
    r = subprocess.run([sys.executable, "-m", "tinygpt", "chat", "--ckpt", str(chat_run), "--temperature", "0",
                        "--max-new-tokens", "12"], input="abcd\n/reset\nhgfe\n/temperature x\n/system rev\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["dcba", "efgh"]
    assert "(history cleared)" in r.stderr and "/temperature takes a number" in r.stderr
    assert "(system message set)" in r.stderr
    r = cli("chat", "--ckpt", chat_run.parent.parent / "nowhere")
    assert r.code == 2


def test_a_run_without_a_template_is_refused_by_chat(base_run):
    r = cli("chat", "--ckpt", base_run)
    assert_one_line_error(r, "no chat template", "--data chats.jsonl")


def test_the_export_carries_the_template_and_transformers_renders_the_same_ids(chat_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    r = cli("export", chat_run, "--out", tmp_path / "hf")
    assert r.code == 0, r.err
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, tok = load_run(chat_run)
    messages = [{"role": "system", "content": "ab ba"}, {"role": "user", "content": "abc"},
                {"role": "assistant", "content": "cba"}, {"role": "user", "content": "hgf"}]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == render(messages, tok, add_generation_prompt=True)[0]
    assert hf_tok.eos_token == END_OF_TURN
    # and back: importing the export gives the same tokenizer, template included
    from tinygpt.hf import read_gpt2_tokenizer

    assert read_gpt2_tokenizer(tmp_path / "hf").chars == tok.chars


@pytest.fixture(scope="module")
def chat_server(chat_run):
    with serving(chat_run) as s:
        yield s


def test_the_chat_endpoint_answers_the_openai_client_streamed_and_not(chat_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "abcd"}]
    got = client.chat.completions.create(model="ft", messages=messages, temperature=0, max_tokens=12,
                                         logprobs=True, top_logprobs=2)
    choice = got.choices[0]
    assert choice.message.content == "dcba" and choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert [t.token for t in choice.logprobs.content] == list("dcba")
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    assert got.usage.completion_tokens == 5  # four letters and the end of turn
    chunks = list(client.chat.completions.create(model="ft", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "dcba"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    two = client.chat.completions.create(model="ft", messages=messages, n=2, seed=3, max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1]
    import httpx

    info = httpx.get(chat_server.url + "/tokenizer_info", timeout=10).json()
    assert info["chat_template"] == CHAT_TEMPLATE and info["eos_token"] == END_OF_TURN


@pytest.mark.parametrize("body,status,words", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "ab"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "ab€"}]}, 400, "does not know: '€'"),
    ({"messages": [{"role": "user", "content": "ab"}], "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    ({"messages": [{"role": "user", "content": "ab"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": "hi"}, 400, "a list of messages"),
])
def test_bad_chat_requests_are_4xx_with_a_clear_body(chat_server, body, status, words):
    import httpx

    r = httpx.post(chat_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_a_run_without_a_template_answers_400_saying_how_to_make_one(base_run):
    import httpx

    with serving(base_run) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "ab"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert "--data chats.jsonl" in r.json()["error"]["message"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_on_the_chat_endpoint(chat_server, tmp_path):
    checks = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", chat_server.url + "/openapi.json",
                        "--include-path", "/v1/chat/completions", "--checks", checks, "--max-examples", "40",
                        "--seed", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "failure" not in r.stdout.lower(), r.stdout[-4000:]
    assert "generated" in r.stdout


def test_the_playground_chat_tab_talks_to_the_model_in_chromium(chat_server, tmp_path):
    from conftest import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 700})  # a phone
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(chat_server.url + "/#chat")
            expect(page.locator("#chat-panel")).to_be_visible()
            expect(page.locator("#chat-note")).to_be_hidden()
            page.fill("#chat_temperature", "0")
            for question in ("abcd", "hgfe"):
                page.fill("#chat-input", question)
                page.press("#chat-input", "Enter")
                expect(page.locator(".msg.assistant").last).to_have_text(question[::-1], timeout=30_000)
                expect(page.locator("#send")).to_be_enabled()
            assert page.locator(".msg.user").all_inner_texts() == ["abcd", "hgfe"]
            page.screenshot(path=str(Path(os.environ.get("TINYGPT_CHAT_SCREENSHOT", tmp_path / "chat.png"))))
            page.click("#chat-reset")
            assert page.locator(".msg").count() == 0
            assert page.evaluate("document.documentElement.scrollWidth") <= 391  # nothing overflows
            page.click("#tab-complete")
            expect(page.locator("#complete-panel")).to_be_visible()
        finally:
            browser.close()
    assert errors == []


@pytest.mark.slow
def test_lm_eval_local_chat_completions_scores_the_fine_tuned_run(chat_server, tmp_path):
    from conftest import REPO

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args",
                        f"base_url={chat_server.url}/v1/chat/completions,model=ft", "--apply_chat_template",
                        "--include_path", "tests/lm_eval_tasks", "--tasks", "tiny_chat",
                        "--output_path", str(tmp_path / "out")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    score = json.loads(path.read_text())["results"]["tiny_chat"]["exact_match,none"]
    assert score >= 0.9, r.stdout[-2000:]  # the reversed words, as the model learned them


def test_a_bpe_run_fine_tunes_on_conversations_and_exports_the_same_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    rng = random.Random(4)
    (tmp_path / "words.txt").write_text(" ".join(word(rng) for _ in range(3000)), encoding="utf-8")
    m, t = tiny_configs(tmp_path / "words.txt", tmp_path / "base", tokenizer="bpe", vocab_size=300, n_embd=64,
                        block_size=24, max_iters=5, head_bias=False)  # no head bias: exportable at any vocabulary
    train(m, t, **QUIET)
    reversal_chats(tmp_path / "c.jsonl", 50, seed=2, system=True)
    m, t = tiny_configs(tmp_path / "c.jsonl", tmp_path / "ft", init_from=str(tmp_path / "base"), max_iters=5)
    train(m, t, **QUIET)
    base, tok = load_tokenizer(tmp_path / "base" / "tokenizer.json"), load_tokenizer(tmp_path / "ft" / "tokenizer.json")
    assert tok.kind == "bpe" and tok.vocab_size == base.vocab_size + 4 and has_chat(tok)
    assert tok.encode("abc hgf") == base.encode("abc hgf")  # every old id kept
    assert cli("export", tmp_path / "ft", "--out", tmp_path / "hf").code == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "rev"}, {"role": "user", "content": "abc"}]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == render(messages, tok, add_generation_prompt=True)[0]


def test_ctrl_c_stops_a_reply_not_the_chat_in_a_terminal(base_run, tmp_path):
    """In a terminal (a pty here): a reply that would run on for thousands of tokens is stopped by
    Ctrl-C, the chat goes on, and /quit ends it with status 0."""
    import pty
    import select
    import signal
    import time

    # Not trained (0 steps): the template's tokens start as the average token, whose logit is the
    # mean of all the others' and so never the largest: at temperature 0 the reply never ends.
    reversal_chats(tmp_path / "c.jsonl", 40, seed=9)
    m, t = tiny_configs(tmp_path / "c.jsonl", tmp_path / "ft", init_from=str(base_run), max_iters=0)
    train(m, t, **QUIET)
    pid, fd = pty.fork()
    if pid == 0:  # the child: tinygpt chat on the pty
        # as in a terminal: Ctrl-C interrupts. A suite started in the background (`... &`) has
        # SIGINT ignored, and an ignored or blocked signal stays so across exec: no KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.execv(sys.executable, [sys.executable, "-m", "tinygpt", "chat", "--ckpt", str(tmp_path / "ft"),
                                  "--max-new-tokens", "4000", "--temperature", "0"])
    seen = bytearray()

    def child_signals() -> list[str]:  # what a failure needs to say: is SIGINT ignored or blocked there?
        status = Path(f"/proc/{pid}/status")
        return [line for line in status.read_text().splitlines() if line.startswith("Sig")] if status.exists() else []

    def wait_for(done, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, (bytes(seen[-500:]), child_signals())
            if select.select([fd], [], [], 0.1)[0]:
                seen.extend(os.read(fd, 4096))

    try:
        wait_for(lambda: b"you> " in seen)
        os.write(fd, b"abcd\n")
        wait_for(lambda: b"bot> " in seen)
        replied = seen.index(b"bot> ") + 5
        wait_for(lambda: len(seen) > replied + 40)  # some of the reply, then Ctrl-C
        os.write(fd, b"\x03")
        wait_for(lambda: b"[stopped]" in seen)
        wait_for(lambda: seen.count(b"you> ") == 2)  # the chat goes on
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, bytes(seen[-500:])
