"""The lecture's last step on a CPU in minutes: fine-tune the `cpu-quick` run into an assistant
that answers "who speaks next?", and score it on scenes it never saw beside the base model.

    python benchmarks/shakespeare_chat.py                    # trains cpu-quick first (~15 s)
    python benchmarks/shakespeare_chat.py --base runs/quick  # or starts from your run

The conversations come from Tiny Shakespeare's own dialogue. The user's turn is two consecutive
speeches, each its speaker's name and the start of its first line, cut to fit cpu-quick's block of
64 characters ("GREMIO: Good morrow, neighb\nBAPTISTA: Good morrow, ne"); the assistant's answer
is the name of who speaks next. Train: every such scene in the first 90% of the text (the base
run's train split); held out: those in the last 10% (its val split: neither model trained on them).

Two scores on the held-out scenes, both models answering greedily: how often the answer is a
speaker's name at all (the form an assistant must learn: an answer, then the end of its turn),
and how often it is the right one:
- alternation: the speaker before last speaks again (a rule, no model);
- base, prompted: the base has never seen a question, but it knows the script's form, so it is
  asked in that form, the same text as "\\n\\nA:\\nLINE\\n\\nB:\\nLINE\\n\\n", and what it writes
  up to the next ":" or line end is its answer;
- fine-tuned: the reply `tinygpt chat` gives at temperature 0.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

USER_CHARS = 42  # the user's turn: a block of 64 keeps room for a name of 19 as the answer
# cpu-quick's own optimizer (Muon) at a third of its learning rate, no dropout: best of three tried
FINE_TUNE = ["--max-iters", "1500", "--batch-size", "64", "--optimizer", "muon", "--muon-lr", "0.02",
             "--learning-rate", "3e-3", "--min-lr", "3e-4", "--lr-schedule", "cosine", "--warmup-iters", "50",
             "--eval-interval", "300", "--eval-iters", "20", "--dropout", "0", "--val-fraction", "0.05"]


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, first line) of each speech: a block that starts with "NAME:" on its own line."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z ']*:", lines[0]) and lines[1].strip():
            out.append((lines[0][:-1], lines[1].strip()))
    return out


def scenes(text: str) -> list[tuple[str, str, str, str, str]]:
    """(A, A's line, B, B's line, who speaks next) for every three speeches in a row, the lines
    cut so that "A: line\\nB: line" fits USER_CHARS."""
    out = []
    found = speeches(text)
    for (a, la), (b, lb), (c, _) in zip(found, found[1:], found[2:]):
        room = max(0, USER_CHARS - len(a) - len(b) - 5) // 2
        out.append((a, la[:room], b, lb[:room], c))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="Tiny Shakespeare's input.txt (default: found as tinygpt finds it)")
    p.add_argument("--base", default=None, help="the base run (default: train cpu-quick into WORK/base)")
    p.add_argument("--work", default="shakespeare_chat", help="where the runs and files go")
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args()
    import torch

    from tinygpt.chat import reply
    from tinygpt.checkpoint import load_run
    from tinygpt.data import find_corpus
    from tinygpt.sampling import generate_stream

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = find_corpus(args.data)
    text = data.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    train, held = scenes(text[:cut]), scenes(text[cut:])
    with open(work / "who_speaks_next.jsonl", "w", encoding="utf-8") as f:
        for a, la, b, lb, c in train:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}: {la}\n{b}: {lb}"},
                                             {"role": "assistant", "content": c}]}) + "\n")

    def tinygpt(*a) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tinygpt", *map(str, a)], check=True)
        return time.perf_counter() - t0

    base = Path(args.base) if args.base else work / "base"
    seconds = {}
    if not args.base:
        seconds["base"] = tinygpt("train", "--preset", "cpu-quick", "--data", data, "--out", base, "--overwrite",
                                  "--no-plot", "--sample-chars", "0")
    chat_dir = work / "chat"
    seconds["fine-tune"] = tinygpt("train", "--init-from", base, "--data", work / "who_speaks_next.jsonl", "--out",
                                   chat_dir, "--overwrite", "--no-plot", "--sample-chars", "0", *FINE_TUNE)

    base_model, base_tok = load_run(base, "best")
    chat_model, chat_tok = load_run(chat_dir, "best")
    everyone = {name for name, _ in speeches(text)}
    hits = {"alternation": 0, "base, prompted": 0, "fine-tuned": 0}
    named = dict.fromkeys(hits, 0)
    examples = []
    for a, la, b, lb, c in held:
        prompt = torch.tensor([base_tok.encode(f"\n\n{a}:\n{la}\n\n{b}:\n{lb}\n\n")])
        written = base_tok.decode([int(t) for t in generate_stream(base_model, prompt, 20, temperature=0)])
        guess = written.split(":")[0].split("\n")[0]
        said = "".join(reply(chat_model, chat_tok, [{"role": "user", "content": f"{a}: {la}\n{b}: {lb}"}], 20,
                             temperature=0))
        for k, answer in (("alternation", a), ("base, prompted", guess), ("fine-tuned", said)):
            hits[k] += answer == c
            named[k] += answer in everyone
        if len(examples) < 5:
            examples.append({"user": f"{a}: {la}\n{b}: {lb}", "answer": c, "base": guess, "fine-tuned": said})
    figures = {"train_conversations": len(train), "held_out": len(held),
               "accuracy": {k: v / len(held) for k, v in hits.items()},
               "a_name": {k: v / len(held) for k, v in named.items()}, "seconds": seconds, "examples": examples}
    print(f"\n{len(train):,} train conversations, {len(held):,} held-out scenes (the last 10% of the text)\n")
    print("| who speaks next? | answers with a speaker's name | the right one |\n|---|---:|---:|")
    for k, v in figures["accuracy"].items():
        print(f"| {k} | {figures['a_name'][k]:.1%} | {v:.1%} |")
    print(f"\nseconds: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}")
    print(json.dumps(examples, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
