"""The `tinygpt` command: train, sample, chat, eval, prepare, serve, studio, runs, export, bench, plot, presets.

Flags are generated from the config dataclasses, so `--help` always shows every setting with its
default and meaning. Errors the user can fix print one line and exit with status 2. Nothing
heavy is imported until a command runs: `tinygpt --help` does not load torch.
"""

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from pathlib import Path

from tinygpt import config as C
from tinygpt.errors import UserError
from tinygpt.resources import memory_guard


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump), with
    the nearest known flags suggested; flags are never abbreviated."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown.group(1).split("=")[0]
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            near = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
            score = {k: difflib.SequenceMatcher(None, flag, k).ratio() for k in near}
            near = [k for k in near if score[k] >= score[near[0]] - 0.05]  # the nearest, and any as near
            if near:
                message = f"unknown flag {flag}; did you mean {' or '.join(near)}?"
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
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # the help already says what the default means
            help_text += f" (default: {f.default!r}"
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


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run directory written by tinygpt train")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="which checkpoint of the run: the best val loss or the latest (default: 'best')")


def build_parser(script: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; `script` names `gpt.py` / `bigram.py` when they are the entry point."""
    parser = Parser(prog="tinygpt", description="GPT from scratch: train, sample and evaluate "
                    "character-level language models.")
    parser.add_argument("--version", action="store_true", help="print tinygpt's version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    parser.commands = sub.choices  # name -> the subcommand's parser

    p = sub.add_parser("train", help="train a model and write a run directory",
                       prog=f"python {script}" if script else None,
                       description="Train a Bigram or GPT model. Settings are layered: lecture defaults "
                       "< --preset < --config < flags.")
    p.add_argument("--preset", help="named settings shipped with tinygpt: "
                   f"{', '.join(C.list_presets())}; or auto: a model sized for your text, your --max-time "
                   "(default 600 s) and this machine (a timed probe), its plan printed before training")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (keys as the flags, "
                   "with underscores)")
    add_fields(p, C.ModelConfig, C.BIGRAM_DEFAULTS)
    add_fields(p, C.TrainConfig, C.BIGRAM_DEFAULTS)

    p = sub.add_parser("sample", help="generate text from a trained run",
                       description="Print text that continues a prompt, streamed as it is generated. "
                       "--num-samples N are generated together, as one batch.")
    add_run_args(p)
    add_fields(p, C.SampleConfig)
    add_fields(p, C.TrainConfig, only={"device", "dtype"})

    p = sub.add_parser("chat", help="chat with a run fine-tuned on conversations, in the terminal",
                       description="An interactive chat with a run fine-tuned on conversations (tinygpt train "
                       "--init-from RUN --data chats.jsonl): replies streamed, the history kept and cut from its "
                       "oldest exchanges to fit the block (the system message kept). Commands: /reset, "
                       "/system TEXT, /temperature X, /quit. Ctrl-C stops a reply, Ctrl-D ends the chat. With "
                       "stdin not a terminal, each line is a user turn and each reply is printed on a line.")
    add_run_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message to start from (default: none)")
    add_fields(p, C.SampleConfig, only={"max_new_tokens", "temperature", "top_k", "top_p", "seed"})
    add_fields(p, C.TrainConfig, only={"device", "dtype"})

    p = sub.add_parser("eval", help="loss over the whole val and train splits",
                       description="Loss in nats per token and bits per character over the whole val and "
                       "train splits: consecutive non-overlapping windows of block_size, each token "
                       "predicted once.")
    add_run_args(p)
    p.add_argument("--data", help="data to evaluate on, split as the run's was (default: the run's own data)")
    p.add_argument("--split", choices=("val", "train", "both"), default="both",
                   help="which split(s) to evaluate (default: 'both')")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: 32)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    add_fields(p, C.TrainConfig, only={"device", "dtype"})

    p = sub.add_parser("serve", help="serve a run: OpenAI-compatible completions API and a web playground",
                       description="Serve a trained run over HTTP: POST /v1/completions in OpenAI's shape "
                       "(streamed or not), GET /v1/models, GET /health, and a playground page at /.")
    add_run_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 is every interface, "
                   "give --api-key with it (default: '127.0.0.1')")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("TINYGPT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests; the environment variable "
                   "TINYGPT_API_KEY keeps it out of the process list (default: none)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="sequences decoded together; more wait their turn (default: 16)")
    add_fields(p, C.SampleConfig, only={"window"})
    add_fields(p, C.TrainConfig, only={"device", "dtype"})

    p = sub.add_parser("studio", help="the whole loop in a browser: bring text, train, watch, compare, sample, inspect",
                       description="Serve the studio: one page to paste or upload a text, train models on it (a "
                       "supervised tinygpt train, one at a time), watch the loss and samples live, stop, resume, "
                       "compare runs, and open any run in the playground. It prints a URL with a secret token; "
                       "no other web page or machine can use it.")
    p.add_argument("--runs", default="runs", metavar="DIR", help="directory of runs; the CLI's runs show up too "
                   "(default: 'runs')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; off loopback, --token is required "
                   "(default: '127.0.0.1')")
    p.add_argument("--port", type=int, default=8500, help="port to listen on; 0 picks a free one (default: 8500)")
    p.add_argument("--open", action=argparse.BooleanOptionalAction, default=None,
                   help="open the page in a browser (default: when run from a terminal)")
    p.add_argument("--token", default=os.environ.get("TINYGPT_STUDIO_TOKEN"), metavar="TOKEN",
                   help="the secret the URL carries (default: a new one each launch; TINYGPT_STUDIO_TOKEN sets it)")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest text accepted (default: 100)")
    p.add_argument("--max-params", type=int, default=50_000_000, help="largest model a job may train "
                   "(default: 50000000)")
    p.add_argument("--max-steps", type=int, default=1_000_000, help="most steps a job may ask for (default: 1000000)")
    p.add_argument("--max-time", type=float, default=86400.0, help="longest a job may train, in seconds "
                   "(default: 86400)")

    p = sub.add_parser("prepare", help="encode a corpus once into a token file that runs memory-map",
                       description="Encode the text once into a file of token ids (in $TINYGPT_CACHE_DIR, "
                       "default DATA_DIR/encoded) that train and eval memory-map. train does this on first "
                       "use; the file is reused while the text is unchanged.")
    add_fields(p, C.TrainConfig, only={"data", "tokenizer", "vocab_size", "text_field", "val_split", "val_fraction"})
    p.add_argument("--force", action="store_true", help="encode again even if the file is up to date, "
                   "replacing a damaged one")

    p = sub.add_parser("runs", help="list the runs in a directory as a table",
                       description="One line per run: name, model size, steps, best val loss, bits/char, date.")
    p.add_argument("dir", nargs="?", default="runs", help="directory holding run directories (default: 'runs')")

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers model (GPT-2 layout)",
                       description="Write a GPT run as a directory that transformers' AutoModelForCausalLM "
                       "and AutoTokenizer load with no custom code: GPT2LMHeadModel weights (safetensors), "
                       "config.json and the run's tokenizer. Runs whose architecture GPT-2 lacks are refused.")
    p.add_argument("run", metavar="RUN", help="run directory written by tinygpt train")
    p.add_argument("--to", choices=("hf",), default="hf", help="output format: hf = transformers (default: 'hf')")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write; it must not exist or be empty (nothing is overwritten)")
    p.add_argument("--which", choices=("latest", "best"), default="best",
                   help="which checkpoint of the run (default: 'best')")

    sub.add_parser("presets", help="list the shipped presets")

    p = sub.add_parser("bench", help="benchmark the fast paths against the plain reference path")
    add_bench_args(p)

    p = sub.add_parser("plot", help="plot train/val loss of one or more runs to a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/loss.png of the first run)")
    p.add_argument("--bpc", action="store_true",
                   help="plot bits per character, comparable across tokenizers (default: nats per token)")
    p.add_argument("--time", action="store_true",
                   help="x axis in training seconds, evals excluded (default: steps)")
    return parser


def add_bench_args(p) -> None:
    p.add_argument("--preset", default="lecture",
                   help="model config to measure: 'lecture' (python gpt.py's defaults) or any preset name, "
                   "or a settings .toml file (default: 'lecture')")
    p.add_argument("--iters", type=int, default=3, help="timed training iterations per path (default: 3)")
    p.add_argument("--repeats", type=int, default=1, help="repeat each timing and report the median (default: 1)")
    p.add_argument("--sample-tokens", type=int, default=None,
                   help="tokens to generate when timing sampling (default: block_size - 1, inside one block)")
    p.add_argument("--sample-batch", type=int, default=64,
                   help="batch size of the batched sampling measurement (default: 64)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of the measured model (default: Tiny Shakespeare's characters)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the fast path under torch.compile (default: off)")
    p.add_argument("--skip-plain", action="store_true", help="do not time the plain path (quick checks)")
    p.add_argument("--dtypes", default=None, metavar="LIST",
                   help="also time the fast path in each of these dtypes, e.g. float32,bfloat16,float16 (float16 "
                   "with its loss scaler); the table says which one auto picks and why (default: none)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="(default: 'auto')")
    p.add_argument("--json", default="bench.json", metavar="PATH", help="where to write the figures "
                   "(default: 'bench.json')")


def main(argv: list[str] | None = None, script: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(script)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, which knows its flags (and its --help)
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.version:
        from tinygpt import version

        print(f"tinygpt {version()}")
        return 0
    if not args.command:
        parser.error("choose a command: train, sample, chat, eval, prepare, serve, studio, runs, export, bench, "
                     "plot or presets")
    try:
        with memory_guard(f"out of memory in tinygpt {args.command}; use a smaller model or batch, "
                          "or a device with more memory"):  # the commands name their own batches
            return COMMANDS[args.command](args)
    except UserError as e:  # ResourceErrors too (out of memory or disk): exit status 4
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; rank 0 says so
            typed = f"python {script}" if script else f"tinygpt {args.command}"  # the command the user typed
            sys.stderr.write(f"{typed}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def cmd_train(args) -> int:
    from tinygpt.distributed import process_group
    from tinygpt.runs import settings_from_flags
    from tinygpt.train import Stopped, note_on_stderr, train

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "version")}
    model_cfg, train_cfg = settings_from_flags(flags, note=note_on_stderr if os.environ.get("RANK", "0") == "0"
                                               else lambda line: None)
    try:
        with process_group(train_cfg.device) as dist:  # one process unless started by torchrun
            result = train(model_cfg, train_cfg, dist=dist)
            if not dist.is_main:
                return 0
            if train_cfg.plot:
                from tinygpt.plot import plot_runs

                plot_runs([result.run_dir])  # RUN/loss.png; `tinygpt plot` redraws it or compares runs
            if train_cfg.sample_chars:
                print_sample(result, train_cfg)
    except Stopped as s:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):  # saved already: a second signal ends it at once
            signal.signal(sig, lambda signum, frame: os._exit(128 + signum))
        return s.exit_code
    return 0


def print_sample(result, cfg: C.TrainConfig) -> None:
    """The lecture's ending: `sample_chars` characters from token 0, from the reported model."""
    from tinygpt.runtime import inference_dtype
    from tinygpt.sampling import sample_text

    print(sample_text(result.model, result.tokenizer, cfg.sample_chars, cfg.seed, result.device,
                      inference_dtype(cfg.dtype, result.device)))


def sampling_setup(args) -> tuple:
    """(SampleConfig, device, inference dtype, model, tokenizer) of `sample` and `chat`."""
    from tinygpt.checkpoint import load_run
    from tinygpt.runtime import inference_dtype, resolve_device

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(C.SampleConfig) if hasattr(args, f.name)}
    cfg = C.build(C.SampleConfig, given)
    device = resolve_device(getattr(args, "device", "auto"))
    model, tokenizer = load_run(args.ckpt, args.which, device)
    return cfg, device, inference_dtype(getattr(args, "dtype", "auto"), device), model, tokenizer


def cmd_sample(args) -> int:
    import torch

    from tinygpt.runtime import autocast, prefill_dtype
    from tinygpt.sampling import generate_stream

    cfg, device, dtype, model, tokenizer = sampling_setup(args)
    prompt = cfg.prompt
    unknown = tokenizer.unknown(prompt)
    if unknown and cfg.drop_unknown:
        prompt = "".join(ch for ch in prompt if ch not in set(unknown))
        sys.stderr.write(f"dropped unknown character(s) from the prompt: {', '.join(map(repr, unknown))}\n")
    ids = tokenizer.encode(prompt) or [0]  # an empty prompt starts from token 0, as the lecture
    if cfg.show_probs and cfg.num_samples != 1:
        raise UserError("--show-probs shows one sample's probabilities; use --num-samples 1")
    say_which(args.ckpt, args.which)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)  # all samples: one batch
    new: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    out = sys.stdout
    stream = cfg.num_samples == 1  # one sample is printed as it is generated
    shown = ""
    if stream:
        out.write(prompt)
    eot = tokenizer.eot_id if cfg.stop_at_end else None
    ended = [False] * cfg.num_samples  # which samples reached the end of their document
    with autocast(device, dtype), memory_guard(
        f"out of memory on {device.type} sampling {cfg.num_samples} sample(s) at once (batch {cfg.num_samples} "
        f"x block {model.config.block_size}, {str(dtype).removeprefix('torch.')}); use a smaller --num-samples"
    ):
        for t in generate_stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, gen,
                                 cfg.kv_cache, cfg.window, prefill_dtype(getattr(args, "dtype", "auto"), device)):
            for i, token in enumerate(t[:, 0].tolist()):
                ended[i] = ended[i] or token == eot
                if not ended[i]:
                    new[i].append(token)
            if all(ended):
                break
            if stream:
                text = tokenizer.decode(new[0])
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    out.write(text[len(shown):])
                    out.flush()
                    shown = text
    if stream:
        out.write(tokenizer.decode(new[0])[len(shown):] + "\n")
        if cfg.show_probs:
            show_probs(model, tokenizer, ids, new[0], out)
        return 0
    for i, row in enumerate(new):
        if i:
            out.write("\n---------------\n")
        out.write(prompt + tokenizer.decode(row) + "\n")
    return 0


def cmd_chat(args) -> int:
    import torch

    from tinygpt.chat import chat_ids, reply
    from tinygpt.runtime import autocast

    cfg, device, dtype, model, tokenizer = sampling_setup(args)
    chat_ids(tokenizer)  # a run without the template is refused here, in one line
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    interactive = sys.stdin.isatty()
    state = {"system": args.system, "temperature": cfg.temperature, "history": []}
    if interactive:
        say_which(args.ckpt, args.which)
        sys.stderr.write(f"chatting with {args.ckpt} (block {model.config.block_size} tokens): /reset, /system "
                         "TEXT, /temperature X, /quit; Ctrl-C stops a reply, Ctrl-D ends the chat\n")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: not the end of the chat
            sys.stderr.write("\n(Ctrl-D or /quit ends the chat)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if chat_command(text, state):
                break
            continue
        unknown = tokenizer.unknown(text)
        if unknown:
            text = "".join(ch for ch in text if ch not in set(unknown))
            sys.stderr.write(f"(dropped character(s) the model does not know: {', '.join(map(repr, unknown))})\n")
        state["history"].append({"role": "user", "content": text or " "})
        system = [{"role": "system", "content": state["system"]}] if state["system"] else []
        answer = []
        if interactive:
            sys.stdout.write("bot> ")
        try:
            with autocast(device, dtype):
                for piece in reply(model, tokenizer, system + state["history"], cfg.max_new_tokens,
                                   state["temperature"], cfg.top_k, cfg.top_p, gen):
                    answer.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:  # stops this reply; what was said so far stays in the history
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        state["history"].append({"role": "assistant", "content": "".join(answer) or " "})
    return 0


def chat_command(text: str, state: dict) -> bool:
    """A /command of `tinygpt chat`; True for /quit."""
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name in ("/quit", "/exit"):
        return True
    if name == "/reset":
        state["history"] = []
        sys.stderr.write("(history cleared)\n")
    elif name == "/system":
        state["system"] = rest or None
        sys.stderr.write(f"(system message {'set' if rest else 'removed'})\n")
    elif name == "/temperature":
        try:
            value = float(rest)
            C.check_sampling(value, None, None)
        except (ValueError, UserError):
            sys.stderr.write(f"(/temperature takes a number from 0 up, got {rest!r})\n")
            return False
        state["temperature"] = value
        sys.stderr.write(f"(temperature {value:g})\n")
    else:
        sys.stderr.write(f"(unknown command {name}; the commands are /reset, /system TEXT, /temperature X, /quit)\n")
    return False


# Probability buckets and their terminal colours (256-colour backgrounds, dark text): red is a
# surprise to the model, green what it expected.
PROB_COLOURS = ((0.05, 196), (0.2, 208), (0.5, 220), (0.8, 148), (1.01, 40))


def show_probs(model, tokenizer, prompt_ids: list[int], new: list[int], out) -> None:
    """How likely the model found each generated token (its own distribution, before temperature
    and filtering) and its three favourites: the text coloured by probability on a terminal,
    else one line per token."""
    import math

    from tinygpt.scoring import token_logprobs

    lp = token_logprobs(model, prompt_ids + new, top=3)
    start = len(prompt_ids)
    rows = [(tokenizer.decode([t]), math.exp(lp.chosen[start + i]),
             [(tokenizer.decode([k]), math.exp(v)) for k, v in lp.top[start + i].items()])
            for i, t in enumerate(new)]
    if out.isatty() and "NO_COLOR" not in os.environ:
        def paint(piece: str, p: float) -> str:
            colour = next(c for limit, c in PROB_COLOURS if p < limit)
            return f"\x1b[48;5;{colour}m\x1b[38;5;16m{piece}\x1b[0m"

        out.write("".join(paint(piece, p) for piece, p, _ in rows) + "\n")
        out.write("probability: " + " ".join(paint(f" <{limit:g} ", limit - 0.01) for limit, _ in PROB_COLOURS[:-1])
                  + " " + paint(" >=0.8 ", 0.9) + "\n")
        return
    out.write("\ntoken\tprobability\tthe model's top 3\n")
    for piece, p, top in rows:
        out.write(f"{piece!r}\t{p:.4f}\t" + "  ".join(f"{k!r} {v:.4f}" for k, v in top) + "\n")


def say_which(run_dir, which: str) -> None:
    """On stderr (stdout is the text): the checkpoint a command reads."""
    from tinygpt.checkpoint import checkpoint_dir, which_checkpoint

    used = which_checkpoint(Path(run_dir), which)
    note = "" if used == which else " (the run has no best checkpoint yet)"
    sys.stderr.write(f"using the {used} checkpoint{note}: {checkpoint_dir(Path(run_dir), used)}\n")


def cmd_eval(args) -> int:
    import torch

    from tinygpt.checkpoint import configs_from_meta, load_run, read_run_meta
    from tinygpt.corpus import Layout, load_corpus, prepare
    from tinygpt.evaluate import evaluate_split
    from tinygpt.runtime import resolve_device, resolve_dtype

    device = resolve_device(getattr(args, "device", "auto"))
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), device)
    meta = read_run_meta(Path(args.ckpt))
    model_cfg, train_cfg = configs_from_meta(meta)
    model, tokenizer = load_run(args.ckpt, args.which, device)
    data_path = args.data or meta["data_path"]
    corpus = load_corpus(prepare(data_path, tokenizer, log=lambda line: sys.stderr.write(line + "\n"),
                                 layout=Layout.of(train_cfg)), model_cfg.block_size)
    say_which(args.ckpt, args.which)
    results = {"run": str(args.ckpt), "data": str(data_path)}
    splits = {"val": (corpus.val, corpus.val_chars), "train": (corpus.train, corpus.train_chars)}
    for name in ("val", "train") if args.split == "both" else (args.split,):
        data, n_chars = splits[name]
        with torch.no_grad(), memory_guard(
            f"out of memory on {device.type} evaluating the {name} split (batch {args.batch_size} x block "
            f"{model_cfg.block_size}, {str(dtype).removeprefix('torch.')}); use a smaller --batch-size"
        ):
            results[name] = evaluate_split(model, data, model_cfg.block_size, device, dtype, n_chars,
                                           args.batch_size, eot=corpus.eot)
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
                 getattr(args, "dtype", "auto"), args.api_key, args.max_batch,
                 getattr(args, "window", "full"))


def cmd_studio(args) -> int:
    from tinygpt.studio import studio

    return studio(args.runs, args.host, args.port, args.open, args.token, args.max_upload_mb, args.max_params,
                  args.max_steps, args.max_time)


def cmd_prepare(args) -> int:
    from tinygpt.corpus import Layout, describe, prepare, read_header
    from tinygpt.data import find_corpus

    keys = ("tokenizer", "vocab_size", "text_field", "val_split", "val_fraction")
    cfg = C.build(C.TrainConfig, {k: getattr(args, k) for k in keys if hasattr(args, k)})
    path = prepare(find_corpus(getattr(args, "data", None)), kind=cfg.tokenizer, vocab_size=cfg.vocab_size,
                   force=args.force, log=lambda line: sys.stderr.write(line + "\n"), layout=Layout.of(cfg))
    header, _ = read_header(path)
    if header["documents"] > 1 or header["empty_documents"]:
        sys.stderr.write(describe(header) + "\n")
    print(f"{path}: {header['train_tokens']:,} train + {header['val_tokens']:,} val tokens ({header['dtype']}) "
          f"of {header['chars']:,} characters")
    return 0


def cmd_runs(args) -> int:
    from tinygpt.runs import list_runs

    print(list_runs(Path(args.dir)))
    return 0


def cmd_export(args) -> int:
    from tinygpt.hf import export_run

    out = export_run(args.run, args.out, args.which)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_presets(args) -> int:
    for name, description in C.list_presets().items():
        print(f"{name:14s} {description}")
    print(f"{'auto':14s} sized for your text, your --max-time (default 600 s) and this machine by a timed probe; "
          "its plan is printed before training")
    return 0


def cmd_bench(args) -> int:
    from tinygpt.bench import run_bench

    return run_bench(args)


def cmd_plot(args) -> int:
    from tinygpt.plot import plot_runs

    out = plot_runs([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.bpc, args.time)
    print(out)
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "chat": cmd_chat, "eval": cmd_eval, "prepare": cmd_prepare,
            "serve": cmd_serve, "studio": cmd_studio,
            "runs": cmd_runs, "export": cmd_export, "presets": cmd_presets, "bench": cmd_bench,
            "plot": cmd_plot}


if __name__ == "__main__":
    sys.exit(main())
