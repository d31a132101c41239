"""`tinygpt serve` (issue 9): the official openai client against a real server process, a real
browser on the playground, every bad input, the worker's batching under load, and the start-up
errors. One tiny model is trained for real and served once for the module; each test talks to it
over HTTP on 127.0.0.1, as a user's program would.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import CHROMIUM, CHROMIUM_ARGS, TINY_TEXT, cli, needs_chromium, serving, tiny_configs

from tinygpt.checkpoint import checkpoint_dir, load_run
from tinygpt.cli import main
from tinygpt.sampling import generate_stream
from tinygpt.serve.api import MAX_BODY_BYTES, MAX_PROMPT_CHARS, MAX_TOKENS
from tinygpt.serve.app import create_app, take_all
from tinygpt.serve.server import load_served
from tinygpt.serve.worker import Event, TextStream
from tinygpt.train import train

LOCAL = "http://127.0.0.1"  # TestClient's own "testserver" is not a name the server answers to
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    data = root / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    model_cfg, train_cfg = tiny_configs(data, root / "run")
    torch.manual_seed(0)
    train(model_cfg, train_cfg, log=lambda *a, **k: None)
    return root / "run"


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir) as s:
        yield s


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir, "best")


def expected(loaded, prompt: str, max_tokens: int, seed: int = 0, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, window: str = "full") -> str:
    """What `tinygpt sample` generates for these settings (its loop, in this process)."""
    model, tok = loaded
    ids = torch.tensor([tok.encode(prompt) or [0]])
    gen = torch.Generator().manual_seed(seed)
    return tok.decode([int(t) for t in generate_stream(model, ids, max_tokens, temperature, top_k, top_p, gen,
                                                       window=window)])


def sse_texts(lines) -> tuple[dict[int, str], dict[int, str], bool]:
    """Parse OpenAI completion chunks: text and finish reason per choice index, and whether [DONE] came."""
    texts, finishes, done = {}, {}, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
            continue
        for c in json.loads(line[len("data: "):])["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finishes[c["index"]] = c["finish_reason"]
    return texts, finishes, done


# --- 1. the official openai client ------------------------------------------------------------


def test_openai_client_greedy_text_equals_tinygpt_sample(server, run_dir):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list().data] == [run_dir.name]
    r = client.completions.create(model=run_dir.name, prompt="All:", max_tokens=40, temperature=0)
    sample = cli("sample", "--ckpt", run_dir, "--which", "best", "--prompt", "All:", "--max-new-tokens", 40,
                 "--temperature", 0, "--dtype", "float32", process=True)  # the server's CPU dtype, refills too
    assert sample.code == 0, sample.err
    assert sample.out == "All:" + r.choices[0].text + "\n"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 40, 44)


def test_openai_client_streaming_seeded_sampling(server, run_dir, loaded):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)
    settings = dict(prompt="First", max_tokens=50, temperature=0.9, top_k=10, top_p=0.95, seed=7)
    chunks = list(client.completions.create(model=run_dir.name, stream=True, stream_options={"include_usage": True},
                                            extra_body={"top_k": 10}, **{k: v for k, v in settings.items()
                                                                         if k != "top_k"}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 1  # streamed in pieces, not one answer
    assert text == expected(loaded, **settings)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 50 and chunks[-1].usage.prompt_tokens == 5
    again = client.completions.create(model=run_dir.name, extra_body={"top_k": 10},
                                      **{k: v for k, v in settings.items() if k != "top_k"})
    assert again.choices[0].text == text  # the same seed gives the same text, streamed or not


def test_prompt_list_n_stop_and_echo(server, loaded):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)
    r = client.completions.create(model="run", prompt=["All:", "Speak"], n=2, max_tokens=30, temperature=1.0,
                                  seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt i's choice j is i * n + j
    for c in r.choices:
        prompt, j = ["All:", "Speak"][c.index // 2], c.index % 2
        assert c.text == expected(loaded, prompt, 30, seed=3 + j, temperature=1.0)
    assert r.usage.prompt_tokens == 4 + 5 and r.usage.completion_tokens == 4 * 30

    greedy = expected(loaded, "All:", 40)
    assert "\n" in greedy
    r = client.completions.create(model="run", prompt="All:", max_tokens=40, temperature=0, stop=["\n"], echo=True)
    assert r.choices[0].text == "All:" + greedy[: greedy.index("\n")]
    assert r.choices[0].finish_reason == "stop"


def test_window_per_request_and_the_servers_default(server, loaded, run_dir):
    """Past the block (16 here), each request's `window` rule gives `tinygpt sample --window`'s
    text; both rules decode in one batch; a server started with --window chunked defaults to it."""
    import concurrent.futures

    def ask(url, **extra):
        body = {"prompt": "All:", "max_tokens": 60, "temperature": 1.0, "seed": 5, **extra}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    want = {w: expected(loaded, "All:", 60, seed=5, temperature=1.0, window=w) for w in ("full", "chunked")}
    assert want["full"] != want["chunked"]  # 60 tokens past a block of 16: the contexts differ
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda w: ask(server.url, **({"window": w} if w else {})), ["full", "chunked", None] * 2))
    assert got == [want["full"], want["chunked"], want["full"]] * 2
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "All:", "window": "half"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "window"
    with serving(run_dir, "--window", "chunked") as chunked:
        assert ask(chunked.url) == want["chunked"] and ask(chunked.url, window="full") == want["full"]


def test_text_stream_holds_back_what_may_become_a_stop_sequence():
    decode = lambda ids: "".join(chr(i) for i in ids)
    s = TextStream(decode, ("ab", "xyz"))
    out = [s.push(ord(ch)) for ch in "qaxyq"]
    assert out == [("q", False), ("", False), ("a", False), ("", False), ("xyq", False)]
    assert s.push(ord("a")) == ("", False) and s.push(ord("b")) == ("", True)
    assert s.text == "qaxyq"
    s = TextStream(decode, ("ab",))
    assert s.push(ord("a")) == ("", False) and s.flush() == "a"  # the end releases what was held
    utf8 = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"))  # byte-level BPE's case
    assert [utf8.push(b) for b in "é!".encode()] == [("", False), ("é", False), ("!", False)]


def test_bigram_run_is_served_too(tmp_path):
    from fastapi.testclient import TestClient

    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    train(*tiny_configs(data, tmp_path / "bigram", model="bigram", max_iters=20), log=lambda *a, **k: None)
    with TestClient(create_app(load_served(str(tmp_path / "bigram"), "best", "cpu")), base_url=LOCAL) as client:
        r = client.post("/v1/completions", json={"prompt": "All:", "max_tokens": 30, "seed": 5})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected(load_run(tmp_path / "bigram", "best"), "All:", 30, 5, 1.0)
        assert client.get("/v1/models").json()["data"][0]["model"] == "bigram"


def test_backlog_is_merged_to_one_chunk_per_choice():
    async def merged():
        queue = asyncio.Queue()
        for e in (Event(0, "a"), Event(1, "x"), Event(0, "b"), Event(0, "c", "length", 3), Event(1, "y")):
            queue.put_nowait(e)
        return await take_all(queue), queue.empty()

    events, empty = asyncio.run(merged())
    assert events == [Event(0, "abc", "length", 3), Event(1, "xy")] and empty


def test_a_failing_step_is_a_500_in_error_shape_and_serving_goes_on(run_dir):
    from fastapi.testclient import TestClient

    app = create_app(load_served(str(run_dir), "best", "cpu"))
    engine = app.state.worker.engine
    step = engine.step
    with TestClient(app, base_url=LOCAL) as client:
        engine.step = lambda tokens: 1 / 0
        r = client.post("/v1/completions", json={"prompt": "All:", "max_tokens": 5})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "Traceback" not in r.text and "ZeroDivision" not in r.text
        with client.stream("POST", "/v1/completions", json={"prompt": "All:", "max_tokens": 5, "stream": True}) as s:
            assert s.status_code == 200 and '"server_error"' in s.read().decode()
        engine.step = step
        r = client.post("/v1/completions", json={"prompt": "All:", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert client.get("/health").json()["active"] == 0


def test_out_of_memory_is_a_503_and_serving_goes_on(run_dir):
    from fastapi.testclient import TestClient

    app = create_app(load_served(str(run_dir), "best", "cpu"))
    engine = app.state.worker.engine
    step = engine.step

    def out_of_memory(tokens):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 51539607552 bytes. Error code 12 (Cannot allocate memory)")

    with TestClient(app, base_url=LOCAL) as client:
        engine.step = out_of_memory
        r = client.post("/v1/completions", json={"prompt": "All:", "max_tokens": 5, "n": 2})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "server_overloaded" and "ran out of memory on cpu generating 2 sequence(s)" in \
            error["message"] and "Traceback" not in r.text
        engine.step = step
        r = client.post("/v1/completions", json={"prompt": "All:", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


# --- 2. a real browser --------------------------------------------------------------------------


@needs_chromium
def test_playground_streams_in_chromium(server, loaded, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 600})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            expect(page.locator("#card-run")).to_contain_text("run (best, step 60)")
            expect(page.locator("#card-params")).to_have_text(f"{sum(p.numel() for p in loaded[0].parameters()):,}")
            page.fill("#prompt", "All:")
            page.fill("#max_tokens", "120")
            page.fill("#temperature", "0")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("characters in", timeout=30_000)
            assert page.inner_text("#output") == "All:" + expected(loaded, "All:", 120)

            page.fill("#max_tokens", str(MAX_TOKENS))  # long enough to be stopped midway
            page.fill("#temperature", "1")
            page.click("#generate")
            page.wait_for_function("document.getElementById('output').textContent.length > 20")
            page.click("#stop")
            expect(page.locator("#status")).to_contain_text("stopped after")
            assert len(page.inner_text("#output")) < len("All:") + MAX_TOKENS

            page.fill("#max_tokens", "300")
            page.fill("#temperature", "0.8")
            page.fill("#seed", "1")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("characters in", timeout=30_000)
            shot = Path(os.environ.get("TINYGPT_SCREENSHOT", tmp_path / "playground.png"))
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    assert errors == []


@needs_chromium
def test_playground_shows_probabilities_and_attention_in_chromium(server, loaded, tmp_path):
    """The generated text coloured by probability, a tooltip whose numbers are the API's, and the
    attention of every layer and head, on a desktop and on a phone-sized screen."""
    import math

    from playwright.sync_api import expect, sync_playwright

    api = httpx.post(server.url + "/v1/completions", json={"prompt": "All:", "max_tokens": 40, "temperature": 0,
                                                           "logprobs": 5}, timeout=60).json()["choices"][0]
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for width, height in ((960, 700), (375, 740)):
                phone = width < 600
                page = browser.new_page(viewport={"width": width, "height": height}, has_touch=phone, is_mobile=phone)
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))

                def point(locator, phone=phone):  # a mouse hovers, a finger taps
                    locator.tap() if phone else locator.hover()

                page.goto(server.url + "/")
                expect(page.locator("#card-run")).to_contain_text("run (best, step 60)")
                page.fill("#prompt", "All:")
                page.fill("#max_tokens", "40")
                page.fill("#temperature", "0")
                page.click("#generate")
                expect(page.locator("#status")).to_contain_text("characters in", timeout=30_000)
                assert page.inner_text("#output") == "All:" + api["text"]
                tokens = page.locator("#output .tok")
                assert tokens.count() == 40  # one coloured span per generated character
                assert all(c.startswith("rgb") for c in tokens.evaluate_all("s => s.map(e => e.style.background)"))
                # a newline has no box, and a space at the end of a line may have none either
                visible = [k for k, t in enumerate(api["logprobs"]["tokens"]) if t.strip()]
                for k in (visible[0], visible[len(visible) // 2], visible[-1]):
                    point(tokens.nth(k))
                    expect(page.locator("#tip")).to_be_visible()
                    shown = page.locator("#tip .p").inner_text()
                    assert shown == f"{math.exp(api['logprobs']['token_logprobs'][k]):.3f}"
                    assert page.locator("#tip tr").count() == 1 + 5  # the header and the top 5
                page.click("#inspect")
                expect(page.locator("#inspect-status")).to_contain_text("attends to")
                atts = page.locator("#attention .att")
                assert atts.count() == 16  # the last block_size characters
                layers = page.locator("#layer option").count()
                heads = page.locator("#head option").count()
                assert (layers, heads) == (2, 2)
                for layer in range(layers):
                    for head in range(heads):
                        page.select_option("#layer", str(layer))
                        page.select_option("#head", str(head))
                        query = max(i for i in range(12) if atts.nth(i).inner_text() not in ("", "\n"))
                        point(atts.nth(query))
                        weights = atts.evaluate_all("s => s.map(e => e.dataset.w)")
                        assert all(w == "" for w in weights[query + 1:])  # causal: nothing after the query
                        assert sum(float(w) for w in weights[:query + 1]) == pytest.approx(1, abs=1e-3)
                        expect(page.locator("#inspect-status")).to_contain_text(f"layer {layer}, head {head}")
                assert page.evaluate("document.documentElement.scrollWidth") <= width + 1  # nothing overflows
                if not phone:
                    tokens.nth(visible[3]).hover()
                    shot = Path(os.environ.get("TINYGPT_INSPECT_SCREENSHOT", tmp_path / "inspect.png"))
                    page.screenshot(path=str(shot), full_page=True)
                    assert shot.stat().st_size > 10_000
                page.close()
        finally:
            browser.close()
    assert errors == []


def test_the_openapi_schema_describes_every_request_and_error(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    paths = schema["paths"]
    expected = {"/v1/completions": {200, 400, 401, 404, 413, 429, 503}, "/tokenize": {200, 400, 401, 404, 413},
                "/detokenize": {200, 400, 401, 404, 413}, "/v1/inspect": {200, 400, 401, 404, 413, 503}}
    for path, statuses in expected.items():
        op = paths[path]["post"]
        assert {int(s) for s in op["responses"]} == statuses, path
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[1] in schema["components"]["schemas"]
        for status in statuses - {200}:
            assert op["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorResponse")
    body = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert body["logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 20}
    assert {"/health", "/v1/models", "/tokenizer_info"} <= set(paths)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    """Fuzzing from /openapi.json (tests/schemathesis_hooks.py only caps how much a completion
    generates): no 5xx, every status and response as documented."""
    checks = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
                        "--checks", checks, "--max-examples", "30", "--seed", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "failure" not in r.stdout.lower(), r.stdout[-4000:]
    assert "generated" in r.stdout  # it really ran


# --- 3. bad input: a 4xx in OpenAI's error shape, never a 500 -----------------------------------

BAD = [
    # (body, status, param, code, words in the message)
    (b'{"prompt": "All:",', 400, None, "invalid_json", "not valid JSON"),
    (b"\xff\xfe", 400, None, "invalid_json", "not valid JSON"),
    (b'["All:"]', 400, None, "invalid_type", "JSON object"),
    ({"prompt": 5}, 400, "prompt", "invalid_type", "a string, a list of strings, a list of token ids or a list "
     "of such lists, got 5"),
    ({"prompt": [0, 1, 10**6]}, 400, "prompt", "invalid_token_id", "token id 1000000 is not in the model's vocabulary"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "invalid_value", "must not be empty"),
    ({"prompt": ["a", 3]}, 400, "prompt.1", "invalid_type", "valid string, got 3"),
    ({"prompt": []}, 400, "prompt", "invalid_value", "1 to 16 prompts"),
    ({"max_tokens": "10"}, 400, "max_tokens", "invalid_type", "valid integer, got '10'"),
    ({"max_tokens": 1.5}, 400, "max_tokens", "invalid_type", "valid integer"),
    ({"stream": "yes"}, 400, "stream", "invalid_type", "valid boolean"),
    ({"stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage", "invalid_type", "valid boolean"),
    ({"stop": ["\n", 7]}, 400, "stop.1", "invalid_type", "valid string, got 7"),
    ({"temperature": True}, 400, "temperature", "invalid_type", "valid number"),
    ({"temperature": -0.1}, 400, "temperature", "invalid_value", "greater than or equal to 0"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value", "less than or equal to 2"),
    ({"top_p": 0}, 400, "top_p", "invalid_value", "greater than 0"),
    ({"top_p": 1.01}, 400, "top_p", "invalid_value", "less than or equal to 1"),
    ({"top_k": 0}, 400, "top_k", "invalid_value", "greater than or equal to 1"),
    ({"max_tokens": -1}, 400, "max_tokens", "invalid_value", "greater than or equal to 0"),
    ({"max_tokens": MAX_TOKENS + 1}, 400, "max_tokens", "invalid_value", f"less than or equal to {MAX_TOKENS}"),
    ({"n": 0}, 400, "n", "invalid_value", "greater than or equal to 1"),
    ({"n": 17}, 400, "n", "invalid_value", "less than or equal to 16"),
    ({"seed": -1}, 400, "seed", "invalid_value", "greater than or equal to 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value", "at most 4"),
    ({"logprobs": 21}, 400, "logprobs", "invalid_value", "less than or equal to 20"),
    ({"logprobs": -1}, 400, "logprobs", "invalid_value", "greater than or equal to 0"),
    ({"best_of": 2}, 400, "best_of", "unsupported_parameter", "not a parameter tinygpt serve accepts"),
    ({"prompt": "Speak€ø"}, 400, "prompt", "unknown_characters", "does not know: '€', 'ø'"),
    ({"prompt": "a" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt", "prompt_too_long", f"limit of {MAX_PROMPT_CHARS:,}"),
    ({"model": "gpt-4"}, 404, "model", "model_not_found", "'gpt-4' is not served here"),
    (b"{" + b" " * MAX_BODY_BYTES + b"}", 413, None, "body_too_large", "over 1,000,000 bytes"),
]


@pytest.mark.parametrize("body,status,param,code,words", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_in_openai_error_shape(server, body, status, param, code, words):
    content = body if isinstance(body, bytes) else json.dumps({"prompt": "All:", **body}).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers=JSON, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert words in error["message"] and "\n" not in error["message"]


# What other web pages and DNS rebinding could send (issue 27): refused before the model runs.
GUARDED = [
    # (headers, content, status, code)
    ({"Content-Type": "text/plain"}, b'{"prompt": "ROMEO:", "max_tokens": 20}', 415, "unsupported_media_type"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, b'{"prompt": "ROMEO:"}', 415, "unsupported_media_type"),
    ({}, b'{"prompt": "ROMEO:"}', 415, "unsupported_media_type"),  # curl -d without a header
    ({**JSON, "Host": "evil.example"}, b'{"prompt": "ROMEO:"}', 400, "bad_host"),
    ({**JSON, "Host": "evil.example:8000", "Origin": "http://evil.example:8000"}, b"{}", 400, "bad_host"),
    ({**JSON, "Origin": "http://evil.example"}, b'{"prompt": "ROMEO:"}', 403, "cross_origin"),
    ({**JSON, "Origin": "null"}, b'{"prompt": "ROMEO:"}', 403, "cross_origin"),
    ({**JSON, "Sec-Fetch-Site": "cross-site"}, b'{"prompt": "ROMEO:"}', 403, "cross_site"),
]


@pytest.mark.parametrize("headers,content,status,code", GUARDED, ids=[g[3] + f"-{i}" for i, g in enumerate(GUARDED)])
def test_other_web_pages_cannot_use_the_server(server, headers, content, status, code):
    r = httpx.post(server.url + "/v1/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code) and "\n" not in error["message"]


def test_the_server_s_own_pages_and_json_clients_get_in(server):
    """Same origin (the playground), curl with JSON, no Origin at all (scripts): all answered."""
    body = {"prompt": "All:", "max_tokens": 2}
    port = server.url.rsplit(":", 1)[1]
    for headers in ({"Origin": server.url}, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
                    {"Sec-Fetch-Site": "same-origin"}, {}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, (headers, r.text)
    assert httpx.get(server.url + "/health", headers={"Host": "evil.example"}).status_code == 400


def test_unknown_paths_and_methods_answer_in_error_shape(server):
    r = httpx.get(server.url + "/v1/chat")
    assert r.status_code == 404 and "POST /v1/completions" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "Traceback" not in server.log.read_text()


def test_api_key_is_required_when_given(run_dir):
    from openai import AuthenticationError, OpenAI

    with serving(run_dir, "--api-key", "s3cret") as s:
        url = s.url + "/v1/completions"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url, json={"prompt": "All:"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").json()["auth"] is True  # the playground asks for the key
        r = httpx.post(url, json={"prompt": "All:", "max_tokens": 3}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).completions.create(model="run",
                                                                                              prompt="All:")


def test_model_card_reports_the_run(server, run_dir, loaded):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    reports = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = min((r for r in reports if "val_loss" in r), key=lambda r: r["val_loss"])
    step = int(checkpoint_dir(run_dir, "best").name.removeprefix("step_"))
    model, tok = loaded
    assert card["id"] == run_dir.name and card["step"] == step and card["checkpoint"] == "best"
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert (card["vocab_size"], card["block_size"]) == (tok.vocab_size, 16)
    assert (card["best_val_loss"], card["best_val_bpc"]) == (best["val_loss"], best["val_bpc"])
    health = server.health()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["model"] == run_dir.name


# --- 4. concurrency: batching, disconnects, bounded load ---------------------------------------


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[dict, dict, bool]:
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        return sse_texts([line async for line in r.aiter_lines()])


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting"])
def test_disconnected_client_frees_its_slots(server, stream):
    before = server.health()
    body = {"prompt": "All:", "max_tokens": MAX_TOKENS, "n": 16, "stream": stream}  # 65k tokens: many seconds
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json=body) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(6)]  # a few tokens arrive; then the client goes away
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and hangs up
            httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.5), json=body)
    deadline = time.monotonic() + 10
    while (h := server.health())["active"] or h["cancelled"] < before["cancelled"] + 16:
        assert time.monotonic() < deadline, h
        time.sleep(0.02)
    assert h["cancelled"] == before["cancelled"] + 16 and h["finished"] == before["finished"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "All:", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5  # still serving


def test_sixteen_concurrent_streams_three_rounds_exact_text_and_flat_memory(server, loaded):
    prompts = ["All:", "First", "Speak", "Resolved", "You are", "Before we", "hear me", "\n"]
    bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": 40, "temperature": 1.0, "top_k": 20,
               "seed": 100 + i} for i in range(16)]
    want = [expected(loaded, b["prompt"], 40, b["seed"], 1.0, 20) for b in bodies]
    assert len(set(want)) == 16  # every client's text is its own

    async def round_of_16():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(_stream(client, server.url, b) for b in bodies))

    rss, before = [], server.health()
    for _ in range(3):
        for (texts, finishes, done), text in zip(asyncio.run(round_of_16()), want):
            assert done and texts == {0: text} and finishes == {0: "length"}
        rss.append(server.rss_kb())
    after = server.health()
    assert after["active"] == 0 and after["finished"] - before["finished"] == 3 * 16
    # Batched: the 16 streams share forwards (one worker, one forward per step for all of them).
    assert (after["tokens"] - before["tokens"]) / (after["steps"] - before["steps"]) > 4
    # Round 1 warms allocator pools and caches; later rounds may not add to them.
    assert rss[2] <= rss[0] + 4096, f"server memory grew over rounds: {rss} kB"


# --- start-up -----------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_damaged_run_is_refused_at_start_like_sample(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    weights = checkpoint_dir(bad, "best") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    missing = tmp_path / "missing"
    garbled = tmp_path / "garbled"
    shutil.copytree(run_dir, garbled)
    (garbled / "run.json").write_text("{not json")
    for run in (bad, missing, garbled):
        code, err = _cli(capsys, "serve", "--ckpt", run, "--port", 0)
        sample_code, sample_err = _cli(capsys, "sample", "--ckpt", run, "--which", "best")
        assert code == sample_code == 2
        assert err.count("\n") == 1 and err.startswith("tinygpt serve: error: ")
        assert err.removeprefix("tinygpt serve: ") == sample_err.removeprefix("tinygpt sample: ")


def test_all_interfaces_without_key_warns(tmp_path, capsys):
    code, err = _cli(capsys, "serve", "--ckpt", tmp_path / "none", "--host", "0.0.0.0")
    assert code == 2  # the missing run stops it before anything listens
    assert "warning: listening on 0.0.0.0 without --api-key" in err.splitlines()[0]
    code, err = _cli(capsys, "serve", "--ckpt", tmp_path / "none", "--host", "0.0.0.0", "--api-key", "k")
    assert "warning" not in err


def test_port_in_use_or_out_of_range_is_one_line(run_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _cli(capsys, "serve", "--ckpt", run_dir, "--port", port)
    assert code == 2 and err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
    code, err = _cli(capsys, "serve", "--ckpt", run_dir, "--port", 70000)
    assert code == 2 and "--port must be in 0-65535" in err


def test_cli_help_does_not_import_the_web_stack():
    code = ("import sys; from tinygpt.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'tinygpt.serve') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
