"""Looking inside the model (issue 20): per-token log-probabilities, exactly the model's own, in
`tinygpt.scoring` and in the server's OpenAI fields (`logprobs`, `echo`, `max_tokens: 0`, token-id
prompts); the tokenizer over HTTP in vLLM's shape; `/v1/inspect`'s probabilities and attention."""

import ast
import json
import math

import httpx
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, serving, tiny_configs

from tinygpt.checkpoint import load_run
from tinygpt.scoring import inspect, token_logprobs
from tinygpt.train import train

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."  # > block 16


def make_run(root, name, **kw):
    data = root / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    torch.manual_seed(0)
    train(*tiny_configs(data, root / name, max_iters=40, **kw), log=lambda *_: None, note=lambda *_: None)
    return root / name


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("logprobs"), "char")


@pytest.fixture(scope="module")
def server(char_run):
    with serving(char_run) as s:
        yield s


def reference(model, ids: list[int]) -> list[float]:
    """Each token's log-prob from its own forward over the block_size tokens before it."""
    block = model.config.block_size
    out = []
    with torch.no_grad():
        for i in range(1, len(ids)):
            logits, _ = model(torch.tensor([ids[max(0, i - block):i]]))
            out.append(F.log_softmax(logits[0, -1].float(), -1)[ids[i]].item())
    return out


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_token_logprobs_are_the_models_own_past_the_block(tmp_path, tokenizer):
    run = make_run(tmp_path, tokenizer, **({"tokenizer": "bpe", "vocab_size": 300} if tokenizer == "bpe" else {}))
    model, tok = load_run(run)
    ids = tok.encode(TEXT * 2)
    assert len(ids) > 2 * model.config.block_size  # the sliding window is exercised
    lp = token_logprobs(model, ids, top=3, batch_size=7)
    assert lp.chosen[0] is None and len(lp.chosen) == len(ids)
    torch.testing.assert_close(torch.tensor(lp.chosen[1:]), torch.tensor(reference(model, ids)), atol=1e-5, rtol=0)
    for i in range(1, len(ids)):
        assert len(lp.top[i]) == 3 and max(lp.top[i].values()) >= lp.chosen[i] - 1e-6


def completion(server, **body):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_scores_the_prompt_as_openai_does(server, char_run):
    model, tok = load_run(char_run)
    ids = tok.encode(TEXT)
    r = completion(server, prompt=TEXT, echo=True, max_tokens=0, logprobs=2)
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert "".join(lp["tokens"]) == TEXT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), torch.tensor(reference(model, ids)),
                               atol=1e-5, rtol=0)
    assert lp["text_offset"] == list(range(len(TEXT)))  # one character per token
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    # The same prompt as token ids, alone and in a batch, gives the same numbers
    by_ids = completion(server, prompt=ids, echo=True, max_tokens=0, logprobs=2)["choices"][0]["logprobs"]
    batch = completion(server, prompt=[ids, ids[:10]], echo=True, max_tokens=0, logprobs=2)["choices"]
    assert by_ids == lp and batch[0]["logprobs"] == lp and batch[1]["logprobs"]["tokens"] == lp["tokens"][:10]
    assert r["usage"]["prompt_tokens"] == len(ids)


def test_what_lm_eval_sends_for_a_loglikelihood(server, char_run):
    """Its payload: echo, max_tokens 1, logprobs 1, the prompt as token ids; it reads
    token_logprobs[ctxlen:-1] and compares each with max(top_logprobs) for is_greedy."""
    model, tok = load_run(char_run)
    context, continuation = tok.encode("All:\nSpeak"), tok.encode(", speak.")
    r = completion(server, prompt=[context + continuation], temperature=0, max_tokens=1, logprobs=1, seed=1234,
                   echo=True)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(context) + len(continuation) + 1  # the prompt, then one generated
    scored = lp["token_logprobs"][len(context):-1]
    expected = reference(model, context + continuation)[len(context) - 1:]
    assert sum(scored) == pytest.approx(sum(expected), abs=1e-4)
    greedy = [t == max(top.values()) for t, top in zip(scored, lp["top_logprobs"][len(context):-1])]
    assert greedy == [abs(e - max(reference_top(model, context + continuation, i))) < 1e-5
                      for i, e in zip(range(len(context), len(context) + len(continuation)), expected)]


def reference_top(model, ids, i):
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[max(0, i - model.config.block_size):i]]))
    return F.log_softmax(logits[0, -1].float(), -1).tolist()


def test_generated_tokens_carry_their_logprobs_streamed_or_not(server, char_run):
    model, tok = load_run(char_run)
    body = dict(prompt="All:", max_tokens=12, temperature=0, logprobs=3)
    whole = completion(server, **body)["choices"][0]
    lp = whole["logprobs"]
    assert "".join(lp["tokens"]) == whole["text"] and len(lp["tokens"]) == 12
    assert lp["text_offset"][0] == len("All:")  # offsets count from the prompt's start
    ids = tok.encode("All:" + whole["text"])
    expected = reference(model, ids)[len("All:") - 1:]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"]), torch.tensor(expected), atol=1e-5, rtol=0)
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"], lp["top_logprobs"]))  # greedy
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in streamed:
            streamed[key] += c["choices"][0]["logprobs"][key]
    assert streamed == lp
    plain = completion(server, prompt="All:", max_tokens=3, temperature=0)["choices"][0]
    assert plain["logprobs"] is None  # not asked for, not computed


def test_the_tokenizer_over_http_in_vllms_shape(server, char_run):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    _, tok = load_run(char_run)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "\n" and info["bos_token"] is None and info["model_max_length"] == 16
    r = httpx.post(server.url + "/tokenize", json={"prompt": "All:\n", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("All:\n") and r["count"] == 5 and r["token_strs"] == list("All:\n")
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "All:\n"}
    assert check_remote_tokenizer_support(server.url + "/v1/completions")  # lm-eval's auto-detection
    remote = RemoteTokenizer(server.url + "/v1/completions")
    assert remote.encode(TEXT) == tok.encode(TEXT) and remote.decode(tok.encode(TEXT)) == TEXT
    assert remote.eos_token_id == tok.encode("\n")[0]  # the prefix token of a rolling perplexity
    bad = httpx.post(server.url + "/tokenize", json={"prompt": "Speak€"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_characters"
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, 99999]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_token_id"


def test_inspect_shows_the_forwards_own_probabilities_and_attention(server, char_run):
    model, tok = load_run(char_run)
    text = "All:\nSpeak, spea"  # 16 tokens = block_size
    r = httpx.post(server.url + "/v1/inspect", json={"text": text, "top": 3}).json()
    ids = tok.encode(text)
    assert [p["token"] for p in r["tokens"]] == list(text) and (r["n_layer"], r["n_head"]) == (2, 2)
    lp = reference(model, ids)
    for i, p in enumerate(r["tokens"][:-1]):
        assert p["next_logprob"] == pytest.approx(lp[i], abs=1e-5) and p["next_prob"] == pytest.approx(math.exp(lp[i]))
        assert len(p["top"]) == 3 and p["top"][0]["prob"] >= p["top"][1]["prob"]
    assert r["tokens"][-1]["next_prob"] is None
    for layer in r["attention"]:
        for head in layer:
            assert [len(row) for row in head] == list(range(1, len(ids) + 1))  # causal: query i sees 0..i
            assert all(abs(sum(row) - 1) < 1e-5 for row in head)
    # Layer 0 recomputed by hand from the weights: embeddings, ln_1, q and k, softmax.
    with torch.no_grad():
        x = model.token_embedding_table(torch.tensor(ids)) + model.position_embedding_table(torch.arange(len(ids)))
        q, k, _ = model.blocks[0].attn.c_attn(model.blocks[0].ln_1(x)).split(32, dim=-1)
        for h in range(2):
            qh, kh = q[:, h * 16:(h + 1) * 16], k[:, h * 16:(h + 1) * 16]
            att = (qh @ kh.T / 4.0).masked_fill(~torch.ones(len(ids), len(ids), dtype=torch.bool).tril(), -math.inf)
            want = att.softmax(-1)
            got = torch.tensor([row + [0.0] * (len(ids) - len(row)) for row in r["attention"][0][h]])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # in-process: the same numbers
    assert inspect(model, ids, 3)["attention"][0][0][5] == pytest.approx(r["attention"][0][0][5], abs=1e-6)


@pytest.mark.parametrize("body, status, code", [
    ({"text": "All: " * 10}, 400, "text_too_long"),
    ({"text": ""}, 400, "invalid_value"),
    ({"text": 5}, 400, "invalid_type"),
    ({"text": "All:", "top": 21}, 400, "invalid_value"),
    ({"text": "All:", "heads": 1}, 400, "unsupported_parameter"),
    ({"text": "All:", "model": "gpt-4"}, 404, "model_not_found"),
])
def test_inspect_refuses_bad_input_in_one_sentence(server, body, status, code):
    r = httpx.post(server.url + "/v1/inspect", json=body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_sample_show_probs_prints_the_models_own_probabilities(char_run):
    from conftest import cli

    model, tok = load_run(char_run, "best")
    r = cli("sample", "--ckpt", char_run, "--prompt", "All:", "--max-new-tokens", 10, "--show-probs", "--seed", 3)
    assert r.code == 0, r.err
    text, _, table = r.out.partition("\n\ntoken\tprobability\tthe model's top 3\n")
    rows = [line.split("\t") for line in table.splitlines()]
    assert len(rows) == 10 and "".join(ast.literal_eval(row[0]) for row in rows) == text[len("All:"):]
    lp = token_logprobs(model, tok.encode(text), top=3)
    for i, row in enumerate(rows):
        assert float(row[1]) == pytest.approx(math.exp(lp.chosen[len("All:") + i]), abs=1e-4)
        assert len(row[2].split("  ")) == 3
    bad = cli("sample", "--ckpt", char_run, "--show-probs", "--num-samples", 2)
    assert bad.code == 2 and "--show-probs shows one sample's probabilities" in bad.err


def test_show_probs_colours_the_text_on_a_terminal(char_run, monkeypatch):
    import io
    import re

    from tinygpt.cli import PROB_COLOURS, show_probs

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    model, tok = load_run(char_run, "best")
    out = Terminal()
    show_probs(model, tok, tok.encode("All:"), tok.encode("\nSpeak"), out)
    painted, legend = out.getvalue().split("probability: ")
    assert re.sub(r"\x1b\[[0-9;]*m", "", painted) == "\nSpeak\n"
    lp = token_logprobs(model, tok.encode("All:\nSpeak"))
    expected = [next(c for limit, c in PROB_COLOURS if math.exp(x) < limit) for x in lp.chosen[len("All:"):]]
    assert [int(c) for c in re.findall(r"\x1b\[48;5;(\d+)m", painted)] == expected  # one colour per token
    assert legend.count("\x1b[48;5;") == len(PROB_COLOURS)
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    show_probs(model, tok, tok.encode("All:"), tok.encode("\nSpeak"), plain)
    assert "\x1b[" not in plain.getvalue() and "token\tprobability" in plain.getvalue()
