"""The `tinygpt` command: train, sample, eval, serve, bench, plot, presets.

Flags are generated from the config dataclasses, so `--help` always shows every setting with its
default and meaning. Errors the user can fix print one line and exit with status 2.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from tinygpt import config as C
from tinygpt.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        sys.exit(2)


def add_fields(parser: argparse.ArgumentParser, cls, extra_defaults: dict | None = None,
               only: set | None = None) -> None:
    """One flag per documented field of `cls`; defaults are SUPPRESSed so we know what was given."""
    group = parser.add_argument_group(cls.__name__)
    for f in C.cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f.metadata["help"] + f" (default: {default!r}"
        if extra_defaults and f.name in extra_defaults:
            help_text += f"; bigram: {extra_defaults[f.name]!r}"
        help_text += ")"
        kwargs = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        base = C.field_base_type(f)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = f.name.upper() if not f.metadata.get("choices") else None
        group.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tinygpt", description="GPT from scratch: train, sample and evaluate "
                    "character-level language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a model and write a run directory",
                       description="Train a Bigram or GPT model. Settings are layered: lecture defaults "
                       "< --preset < --config < flags.")
    p.add_argument("--preset", help=f"named settings shipped with tinygpt: {', '.join(C.list_presets())}")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (keys as the flags, "
                   "with underscores)")
    add_fields(p, C.ModelConfig, C.BIGRAM_DEFAULTS)
    add_fields(p, C.TrainConfig, C.BIGRAM_DEFAULTS)

    p = sub.add_parser("sample", help="generate text from a trained run",
                       description="Print text that continues a prompt, streamed as it is generated.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="run directory written by tinygpt train")
    p.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="which checkpoint of the run (default: 'latest')")
    add_fields(p, C.SampleConfig)
    add_fields(p, C.TrainConfig, only={"device", "dtype"})

    p = sub.add_parser("eval", help="loss over the whole val and train splits",
                       description="Loss in nats per token and bits per character over the whole val and "
                       "train splits: consecutive non-overlapping windows of block_size, each token "
                       "predicted once.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="run directory written by tinygpt train")
    p.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="which checkpoint of the run (default: 'latest')")
    p.add_argument("--data", help="text file to evaluate on (default: the run's own data)")
    p.add_argument("--split", choices=("val", "train", "both"), default="both",
                   help="which split(s) to evaluate (default: 'both')")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: 32)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    add_fields(p, C.TrainConfig, only={"device", "dtype"})

    p = sub.add_parser("serve", help="serve a run: OpenAI-compatible completions API and a web playground",
                       description="Serve a trained run over HTTP: POST /v1/completions in OpenAI's shape "
                       "(streamed or not), GET /v1/models, GET /health, and a playground page at /.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="run directory written by tinygpt train")
    p.add_argument("--which", choices=("latest", "best"), default="best",
                   help="which checkpoint of the run; best falls back to latest (default: 'best')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 is every interface, "
                   "give --api-key with it (default: '127.0.0.1')")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("TINYGPT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests; the environment variable "
                   "TINYGPT_API_KEY keeps it out of the process list (default: none)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="sequences decoded together; more wait their turn (default: 16)")
    add_fields(p, C.TrainConfig, only={"device", "dtype"})

    p = sub.add_parser("presets", help="list the shipped presets")

    p = sub.add_parser("bench", help="benchmark the fast paths against the plain reference path")
    from tinygpt.bench import add_bench_args

    add_bench_args(p)

    p = sub.add_parser("plot", help="plot train/val loss of one or more runs to a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/loss.png of the first run)")
    p.add_argument("--bpc", action="store_true",
                   help="plot bits per character, comparable across tokenizers (default: nats per token)")
    p.add_argument("--time", action="store_true",
                   help="x axis in training seconds, evals excluded (default: steps)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; rank 0 says so
            sys.stderr.write(f"tinygpt {args.command}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def cmd_train(args) -> int:
    from tinygpt.distributed import process_group
    from tinygpt.train import Stopped, resume_flags, train

    flags = {k: v for k, v in vars(args).items() if k != "command"}
    # On --resume, flags are checked against the saved run, whose settings fill in the rest.
    model_cfg, train_cfg = C.resolve_train_settings(resume_flags(flags) if flags.get("resume") else flags)
    try:
        with process_group(train_cfg.device) as dist:  # one process unless started by torchrun
            train(model_cfg, train_cfg, flags, dist=dist)
    except Stopped as s:
        return s.exit_code
    return 0


def cmd_sample(args) -> int:
    import torch

    from tinygpt.checkpoint import load_run
    from tinygpt.runtime import autocast, inference_dtype, resolve_device
    from tinygpt.sampling import generate_stream

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(C.SampleConfig) if hasattr(args, f.name)}
    cfg = C.build(C.SampleConfig, given)
    device = resolve_device(getattr(args, "device", "auto"))
    dtype = inference_dtype(getattr(args, "dtype", "auto"), device)
    model, tokenizer = load_run(args.ckpt, args.which, device)
    prompt = cfg.prompt
    unknown = tokenizer.unknown(prompt)
    if unknown and cfg.drop_unknown:
        prompt = "".join(ch for ch in prompt if ch not in set(unknown))
        sys.stderr.write(f"dropped unknown character(s) from the prompt: {', '.join(map(repr, unknown))}\n")
    ids = tokenizer.encode(prompt) or [0]  # an empty prompt starts from token 0, as the lecture
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = sys.stdout
    for i in range(cfg.num_samples):
        if i:
            out.write("\n---------------\n")
        out.write(prompt)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        new: list[int] = []
        shown = ""
        with autocast(device, dtype):
            for t in generate_stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                     cfg.top_p, gen, cfg.kv_cache):
                new.append(int(t))
                text = tokenizer.decode(new)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    out.write(text[len(shown):])
                    out.flush()
                    shown = text
        out.write(tokenizer.decode(new)[len(shown):] + "\n")
    return 0


def cmd_eval(args) -> int:
    import torch

    from tinygpt.checkpoint import configs_from_meta, load_run, read_run_meta
    from tinygpt.data import read_text
    from tinygpt.evaluate import evaluate_split
    from tinygpt.runtime import resolve_device, resolve_dtype
    from tinygpt.train import encode_corpus

    device = resolve_device(getattr(args, "device", "auto"))
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), device)
    meta = read_run_meta(Path(args.ckpt))
    model_cfg, _ = configs_from_meta(meta)
    model, tokenizer = load_run(args.ckpt, args.which, device)
    data_path = Path(args.data or meta["data_path"])
    text = read_text(data_path)
    corpus = encode_corpus(data_path, text, tokenizer, model_cfg.block_size)
    results = {"run": str(args.ckpt), "data": str(data_path)}
    splits = {"val": (corpus.val, corpus.val_chars), "train": (corpus.train, corpus.train_chars)}
    for name in ("val", "train") if args.split == "both" else (args.split,):
        data, n_chars = splits[name]
        with torch.no_grad():
            results[name] = evaluate_split(model, data, model_cfg.block_size, device, dtype, n_chars,
                                           args.batch_size)
    if args.json:
        print(json.dumps(results))
    else:
        for name in ("val", "train"):
            if name in results:
                r = results[name]
                print(f"{name}: loss {r['loss']:.4f} nats/token, {r['bits_per_char']:.4f} bits/char "
                      f"over {r['tokens']:,} tokens")
    return 0


def cmd_serve(args) -> int:
    from tinygpt.serve import serve

    return serve(args.ckpt, args.which, args.host, args.port, getattr(args, "device", "auto"),
                 getattr(args, "dtype", "auto"), args.api_key, args.max_batch)


def cmd_presets(args) -> int:
    for name, description in C.list_presets().items():
        print(f"{name:14s} {description}")
    return 0


def cmd_bench(args) -> int:
    from tinygpt.bench import run_bench

    return run_bench(args)


def cmd_plot(args) -> int:
    from tinygpt.plot import plot_runs

    out = plot_runs([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.bpc, args.time)
    print(out)
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "serve": cmd_serve, "presets": cmd_presets,
            "bench": cmd_bench, "plot": cmd_plot}


if __name__ == "__main__":
    sys.exit(main())
