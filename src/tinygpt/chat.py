"""Conversations: OpenAI's fine-tuning format in, a chat template, and the rows a model is
fine-tuned on with the loss on the assistant's answers only (the lecture's last step).

The format, one conversation a line of a .jsonl file (what every tool exports):

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

`--data-format auto` takes a .jsonl file for conversations when its first record has a
"messages" list (`--data-format chat` insists, `text` never). An assistant message with
`"weight": 0` is kept as context but not learned, as in OpenAI's format.

The template: each message is its role's token, its content, and the end-of-turn token; a
prompt for a reply ends with the assistant's token, and a reply ends at its end-of-turn:

    <|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|>

The four tokens are added to the end of the tokenizer's vocabulary (every old id keeps its
meaning, so a base run's weights carry over); content is always encoded as text, so no message
can spell one. CHAT_TEMPLATE is the same template in Jinja, for transformers.

Training rows: one conversation a row of block_size + 1 tokens, padded, so no attention ever
crosses from one conversation into another. The targets are the assistant's content and its
end-of-turn token (`--loss-on assistant`) or every token after the first (`all`); padding is
never scored. A conversation longer than the row loses its oldest exchanges (a user message and
what follows it up to the next), the system message kept; one that still does not fit with its
last answer is dropped. Rows live in memory: a fine-tuning set is thousands of conversations,
not gigabytes.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tinygpt.data import IGNORE
from tinygpt.errors import UserError

SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END_OF_TURN)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
FORMAT_HINT = 'each line one conversation: {"messages": [{"role": "user", "content": "..."}, ' \
              '{"role": "assistant", "content": "..."}]}'


# --- the file -------------------------------------------------------------------------------------


def looks_like_chat(path) -> bool:
    """Whether `path` is a .jsonl file whose first record has a "messages" list."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return isinstance(record, dict) and isinstance(record.get("messages"), list)
    except (OSError, ValueError):
        return False
    return False


def read_conversations(path) -> list[list[dict]]:
    """Every conversation of `path`, checked: one line naming the line and what is wrong with it
    (not JSON, no messages, an unknown role, empty content, no assistant turn)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; give a .jsonl file of conversations ({FORMAT_HINT})")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n}: not UTF-8 (byte {e.start} of the line); convert the file, e.g. "
                                "with iconv -t UTF-8") from None
            if line.strip():
                out.append(_conversation(line, f"{path} line {n}"))
    if not out:
        raise UserError(f"{path} has no conversations; {FORMAT_HINT}")
    return out


def _conversation(line: str, where: str) -> list[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg}, column {e.colno}); {FORMAT_HINT}") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: no "messages" list; {FORMAT_HINT}')
    out = []
    for k, m in enumerate(messages, 1):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLE_TOKENS:
            raise UserError(f"{where}, message {k}: unknown role {role!r}; the roles are system, user and assistant")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: their text, joined
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str) or not content:
            raise UserError(f"{where}, message {k} ({role}): empty content; give every message some text")
        weight = m.get("weight", 1)
        if weight not in (0, 1):
            raise UserError(f"{where}, message {k}: weight must be 0 or 1, got {weight!r}")
        out.append({"role": role, "content": content, "weight": weight})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant turn; a conversation teaches only through the assistant's answers")
    return out


# --- the tokenizer --------------------------------------------------------------------------------


def has_chat(tokenizer) -> bool:
    """Whether `tokenizer` has the chat template's tokens (a run fine-tuned on conversations)."""
    return all(_token_id(tokenizer, t) is not None for t in CHAT_TOKENS)


def _token_id(tokenizer, token: str) -> int | None:
    return tokenizer.stoi.get(token) if tokenizer.kind == "char" else tokenizer.hf.token_to_id(token)


def with_chat(tokenizer):
    """`tokenizer` with the chat tokens it lacks added as new last ids (old ids unchanged)."""
    missing = [t for t in CHAT_TOKENS if _token_id(tokenizer, t) is None]
    if not missing:
        return tokenizer
    if tokenizer.kind == "char":
        from tinygpt.tokenizer import CharTokenizer

        return CharTokenizer(tokenizer.chars + missing)
    from tokenizers import Tokenizer

    from tinygpt.tokenizer import BPETokenizer

    hf = Tokenizer.from_str(tokenizer.hf.to_str())
    hf.add_special_tokens(missing)
    return BPETokenizer(hf, tokenizer.literal_specials)


def chat_ids(tokenizer) -> dict[str, int]:
    """The template's token ids by role (and "end"); a UserError for a run without them."""
    if not has_chat(tokenizer):
        raise UserError("this run has no chat template (it was not fine-tuned on conversations); make one with "
                        "tinygpt train --init-from RUN --data chats.jsonl")
    ids = {role: _token_id(tokenizer, t) for role, t in ROLE_TOKENS.items()}
    return {**ids, "end": _token_id(tokenizer, END_OF_TURN)}


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """The template's token ids of `messages` and, for each, whether it is an answer's token (an
    assistant's content or its end-of-turn: what --loss-on assistant learns)."""
    ids, scored = [], []
    for piece_ids, piece_scored in (_message(m, tokenizer, chat_ids(tokenizer)) for m in messages):
        ids += piece_ids
        scored += piece_scored
    if add_generation_prompt:
        ids.append(chat_ids(tokenizer)["assistant"])
        scored.append(False)
    return ids, scored


def _message(m: dict, tokenizer, ids: dict) -> tuple[list[int], list[bool]]:
    body = tokenizer.encode(m["content"])
    learned = m["role"] == "assistant" and m.get("weight", 1) != 0
    return [ids[m["role"]], *body, ids["end"]], [False] + [learned] * (len(body) + 1)


def fit(messages: list[dict], tokenizer, length: int) -> tuple[list[int], list[bool], int] | None:
    """The conversation rendered in at most `length` tokens: whole, or without its oldest
    exchanges (the system message kept). Returns (ids, scored, exchanges cut), or None when even
    its last exchange does not fit or what fits has nothing to learn."""
    ids = chat_ids(tokenizer)
    pieces = [_message(m, tokenizer, ids) for m in messages]
    system, cuts = _cuts(messages)
    head = sum(len(p[0]) for p in pieces[:system])
    for n_cut, start in enumerate(cuts):
        if head + sum(len(p[0]) for p in pieces[start:]) <= length:
            kept = pieces[:system] + pieces[start:]
            out_ids = [t for p in kept for t in p[0]]
            out_scored = [s for p in kept for s in p[1]]
            return (out_ids, out_scored, n_cut) if any(out_scored) else None
    return None


def prompt_ids(messages: list[dict], tokenizer, room: int) -> list[int]:
    """The prompt for the assistant's next reply to `messages`, in at most `room` tokens: the
    oldest exchanges are cut first, the system message kept; the newest message is always kept
    (cut from its start if it alone is too long)."""
    ids = chat_ids(tokenizer)
    pieces = [_message(m, tokenizer, ids)[0] for m in messages]
    system, cuts = _cuts(messages)
    head = [t for p in pieces[:system] for t in p]
    for start in cuts:
        body = head + [t for p in pieces[start:] for t in p] + [ids["assistant"]]
        if len(body) <= room:
            return body
    last = [t for p in pieces[-1:] for t in p] + [ids["assistant"]]
    return head + last if len(head) + len(last) <= room else last[-room:]


def _cuts(messages: list[dict]) -> tuple[int, list[int]]:
    """(1 if a system message leads, else 0; where the conversation may start once its oldest
    exchanges are cut: after the system message, or at a later user message)."""
    system = 1 if messages and messages[0]["role"] == "system" else 0
    return system, [system] + [i for i in range(system + 1, len(messages)) if messages[i]["role"] == "user"]


# --- the rows -------------------------------------------------------------------------------------


@dataclass
class ChatSplit:
    """Conversations as rows: `rows` (N, block_size + 1) token ids, `targets` (N, block_size)
    the ids to predict (IGNORE where not scored), `scored` how many targets count, `chars` how
    many characters they spell (a special token counts as one)."""

    rows: torch.Tensor
    targets: torch.Tensor
    scored: int
    chars: int

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows[index, :-1], self.targets[index]


class ChatSampler:
    """Random conversations, drawn as `data.BatchSampler` draws windows: the whole global batch
    each step from its own seeded generator (saved in checkpoints), each rank its share."""

    def __init__(self, split: ChatSplit, batch_size: int, seed: int, grad_accum: int = 1, rank: int = 0,
                 world: int = 1):
        self.split, self.batch_size, self.grad_accum, self.rank, self.world = split, batch_size, grad_accum, rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = self.world * self.grad_accum * self.batch_size
        picks = torch.randint(len(self.split), (n,), generator=self.generator)
        picks = picks.view(self.grad_accum, self.world, self.batch_size)[:, self.rank]
        return [self.split.batch(p) for p in picks]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class ChatStats:
    conversations: int
    messages: int
    train: int
    val: int
    tokens: int
    scored: int
    cut: int
    dropped: int

    def describe(self, name: str, block_size: int, loss_on: str) -> str:
        share = "" if not self.tokens else f", {self.scored / self.tokens:.0%} of them in the loss ("
        share += ("the assistant's answers and their end-of-turn tokens)" if loss_on == "assistant"
                  else "every token after a conversation's first)") if self.tokens else ""
        return (f"{name}: {self.conversations:,} conversations, {self.messages:,} messages; {self.train:,} train "
                f"and {self.val:,} val (held out whole, seeded); {self.tokens:,} tokens{share}; {self.cut:,} cut "
                f"to fit the block of {block_size} (oldest exchanges first, the system message kept), "
                f"{self.dropped:,} dropped (even their last answer does not fit)")


def build_splits(conversations: list[list[dict]], tokenizer, block_size: int, loss_on: str,
                 val_fraction: float, where: str = "the data") -> tuple[ChatSplit, ChatSplit, ChatStats]:
    """The train and val rows of `conversations`: a seeded share `val_fraction` of them (at least
    one) held out whole, as --val-split documents does."""
    from tinygpt.corpus import choose_val_docs

    fitted, cut, dropped = [], 0, 0
    for messages in conversations:
        got = fit(messages, tokenizer, block_size + 1)
        if got is None:
            dropped += 1
            continue
        ids, scored, n_cut = got
        cut += n_cut > 0
        fitted.append((ids, scored if loss_on == "assistant" else [True] * len(ids)))
    if len(fitted) < 2:
        raise UserError(f"{where}: {len(fitted)} conversation(s) fit the block of {block_size} tokens ({dropped} "
                        "dropped: even their last answer is longer); training needs at least 2 (one for val): "
                        "give more conversations, shorter ones, or a run with a larger block")
    val = choose_val_docs(len(fitted), val_fraction)
    specials = set(chat_ids(tokenizer).values())
    splits = [_rows([f for f, v in zip(fitted, val) if v == want], block_size, specials, tokenizer)
              for want in (False, True)]
    stats = ChatStats(len(conversations), sum(map(len, conversations)), len(splits[0]), len(splits[1]),
                      sum(len(ids) for ids, _ in fitted), sum(sum(s[1:]) for _, s in fitted), cut, dropped)
    return splits[0], splits[1], stats


def _rows(fitted: list, block_size: int, specials: set, tokenizer) -> ChatSplit:
    rows = torch.zeros(len(fitted), block_size + 1, dtype=torch.long)
    targets = torch.full((len(fitted), block_size), IGNORE, dtype=torch.long)
    for i, (ids, scored) in enumerate(fitted):
        t = torch.tensor(ids, dtype=torch.long)
        rows[i, : len(ids)] = t
        rows[i, len(ids):] = ids[-1]  # padding: never scored, never attended to from a scored position
        keep = torch.tensor(scored[1:], dtype=torch.bool)
        targets[i, : len(ids) - 1] = torch.where(keep, t[1:], torch.full_like(t[1:], IGNORE))
    scored_ids = targets[targets != IGNORE].tolist()
    lengths = {}
    chars = sum(1 if t in specials else lengths.setdefault(t, len(tokenizer.decode([t]))) for t in scored_ids)
    return ChatSplit(rows, targets, len(scored_ids), chars)


def random_batches(split: ChatSplit, batch_size: int, n: int, seed: int):
    sampler = ChatSampler(split, batch_size, seed)
    for _ in range(n):
        yield sampler.next_step()[0]


def windows(split: ChatSplit, batch_size: int):
    """Every conversation once, in order, `batch_size` a batch (the whole-split evaluation)."""
    for i in range(0, len(split), batch_size):
        yield split.batch(torch.arange(i, min(i + batch_size, len(split))))


def alphabet(conversations: list[list[dict]]) -> str:
    """The distinct characters of every message, in order of first appearance."""
    return "".join(dict.fromkeys(ch for c in conversations for m in c for ch in m["content"]))


def contents(conversations: list[list[dict]]):
    """Each message's text, in order (what a tokenizer trained on conversations sees)."""
    for c in conversations:
        for m in c:
            yield m["content"] + "\n"


# --- talking to a fine-tuned model ----------------------------------------------------------------


def stop_ids(tokenizer) -> set[int]:
    """Tokens that end a reply: its end of turn, or any other turn's start (and a document's end)."""
    ids = set(chat_ids(tokenizer).values())
    return ids | ({tokenizer.eot_id} if tokenizer.eot_id is not None else set())


def reply_room(block_size: int, max_new_tokens: int) -> int:
    """How many tokens of the conversation a prompt keeps: the block, less room for the reply
    (at most half the block: a long reply slides on past it)."""
    return max(1, block_size - min(max_new_tokens, block_size // 2))


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float = 1.0,
          top_k: int | None = None, top_p: float | None = None, generator=None):
    """Yield the assistant's reply to `messages` as pieces of text, streamed, until its end of
    turn (or `max_new_tokens`)."""
    from tinygpt.sampling import generate_stream

    device = next(model.parameters()).device
    ids = prompt_ids(messages, tokenizer, reply_room(model.config.block_size, max_new_tokens))
    stops, new, shown = stop_ids(tokenizer), [], ""
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for t in generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator):
        token = int(t[0, 0])
        if token in stops:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text
    rest = tokenizer.decode(new)[len(shown):]
    if rest:
        yield rest
