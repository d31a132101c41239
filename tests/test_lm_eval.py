"""EleutherAI's lm-evaluation-harness scores a served run end to end (issue 20): the harness's own
`lm_eval` command, `--model local-completions` against a real `tinygpt serve`, the tokenizer that
`tinygpt export` writes, and the four kinds of task in `tests/lm_eval_tasks/`. Its per-document
log-likelihoods must be what tinygpt computes itself."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_TEXT, cli, serving, tiny_configs

from tinygpt.checkpoint import load_run
from tinygpt.scoring import token_logprobs
from tinygpt.train import train

TASKS = ["tiny_ll", "tiny_mc", "tiny_rolling", "tiny_gen"]


@pytest.mark.slow
def test_lm_eval_scores_a_served_run(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    train(*tiny_configs(data, tmp_path / "run", n_embd=48, max_iters=60), log=lambda *_: None,
          note=lambda *_: None)  # n_embd >= vocab: exportable
    assert cli("export", tmp_path / "run", "--to", "hf", "--out", tmp_path / "hf").code == 0
    model, tok = load_run(tmp_path / "run", "best")  # what serve serves
    newline = tok.encode("\n")[0]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with serving(tmp_path / "run") as server:
        args = (f"base_url={server.url}/v1/completions,model=run,tokenizer={tmp_path / 'hf'},"
                f"tokenizer_backend=huggingface,tokenized_requests=True,max_length=64,"
                f"custom_prefix_token_id={newline}")
        r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                            "--include_path", "tests/lm_eval_tasks", "--tasks", ",".join(TASKS),
                            "--output_path", str(tmp_path / "out"), "--log_samples"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for task in TASKS:
        assert f"|{task}" in r.stdout.replace(" ", ""), r.stdout  # a row of the results table each

    def samples(task):
        (path,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines()]

    def own(context: str, continuation: str, prefix: list[int] = ()) -> float:
        """tinygpt's log-likelihood of `continuation` after `context`; as the harness does, the
        context's trailing whitespace (here a newline) is scored as part of the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ids = list(prefix) + tok.encode(context)
        lp = token_logprobs(model, ids + tok.encode(continuation))
        return sum(lp.chosen[len(ids):])

    for s in samples("tiny_ll"):
        ((ll, _greedy),) = s["filtered_resps"] if isinstance(s["filtered_resps"][0], list) else [s["filtered_resps"]]
        assert float(ll) == pytest.approx(own(s["doc"]["context"], s["doc"]["continuation"]), abs=1e-4)
    for s in samples("tiny_mc"):
        got = [float(resp[0]) for resp in s["filtered_resps"]]  # the samples file logs them as strings
        want = [own(s["doc"]["context"], c) for c in s["doc"]["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
    for s in samples("tiny_rolling"):  # the first character is conditioned on the prefix, a newline
        got = s["filtered_resps"] if isinstance(s["filtered_resps"], (str, float)) else s["filtered_resps"][0]
        assert float(got) == pytest.approx(own("", s["doc"]["text"], [newline]), abs=1e-4)
    for s in samples("tiny_gen"):
        out = s["filtered_resps"][0]
        assert isinstance(out, str) and "\n" not in out and "." not in out  # the stop sequences held
