"""Synthetic passkey-retrieval training documents (a corpus that teaches retrieval).

Each document is one passkey episode in the format `mimo_jax.eval.passkey` evaluates:

    INTRO + FILLER * a + NEEDLE(key) + FILLER * b + QUESTION + " " + key

at a random length and a random needle depth, followed by a tail that pads the document to
exactly `n_bytes` bytes: `tail="qa"` asks the question again (and answers it) after more
filler (0 to `tail_filler` FILLER sentences before each repetition, so with a small
`tail_filler` a document holds many copies of the key to learn copying from),
`tail="text"` is a slice of other text (the interpreter's standard-library source).
`text_docs` of the documents are plain other text (the mixture). With the byte tokenizer a
document is then `n_bytes + 2` tokens (BOS, EOS), so with `n_bytes = seq_len - 2` every
packed training row is exactly one document and no episode is cut between two rows (the
packer splits documents at row boundaries).

`filler_text`: the share of episodes whose filler is a slice of that other text instead of
the evaluation's FILLER sentences (so retrieval does not depend on one filler).

    python -m mimo_jax.data.passkey_docs OUT.jsonl --docs 4000 --bytes 510
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterable, Iterator

# The evaluation's template (mimo_jax.eval.passkey), repeated here so the data pipeline needs
# no model code; tests/test_long_context.py checks that the two agree.
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5


def other_text(max_chars: int = 1 << 21, seed: int = 0) -> str:
    """ASCII text for tails and text filler: standard-library `.py` files (seeded order)."""
    from mimo_jax.data.sources import stdlib_python_files

    files = stdlib_python_files()
    random.Random(seed).shuffle(files)
    parts, total = [], 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().encode("ascii", "ignore").decode("ascii")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:  # no stdlib sources: repeat the filler
        return FILLER * (max_chars // len(FILLER) + 1)
    return "".join(parts)[:max_chars]


def _slice(rng: random.Random, text: str, n: int) -> str:
    if n <= 0:
        return ""
    if len(text) <= n:
        return (text * (n // max(len(text), 1) + 1))[:n]
    start = rng.randrange(0, len(text) - n)
    return text[start:start + n]


def episode_overhead(key: str = "0" * KEY_DIGITS) -> int:
    """Bytes of an episode without filler."""
    return len(INTRO + NEEDLE.format(key=key) + QUESTION + " " + key)


def passkey_document(rng: random.Random, n_bytes: int, text: str, *,
                     min_episode: int | None = None, filler_text: float = 0.0,
                     tail: str = "text", tail_filler: int = 3) -> tuple[str, dict]:
    """(document of exactly `n_bytes` ASCII bytes, {"key", "depth", "episode_bytes",
    "needle_at", "answer_at"}): `needle_at` is the byte offset of the needle's key,
    `answer_at` that of the answer's key (the last `KEY_DIGITS` bytes of the episode)."""
    key = str(rng.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1))
    base = episode_overhead(key)
    if n_bytes < base:
        raise ValueError(f"{n_bytes} bytes cannot hold a passkey episode ({base} bytes)")
    lo = base if min_episode is None else min(max(min_episode, base), n_bytes)
    length = rng.randint(lo, n_bytes)
    depth = rng.random()
    room = length - base
    if rng.random() < filler_text:  # filler cut from other text, whole lines flattened
        fill = _slice(rng, text, room).replace("\n", " ")
        before = round(depth * room)
        head, after = fill[:before], fill[before:]
    else:
        n = room // len(FILLER)
        before = round(depth * n)
        head, after = FILLER * before, FILLER * (n - before)
    needle = NEEDLE.format(key=key)
    episode = INTRO + head + needle + after + QUESTION + " " + key
    needle_at = len(INTRO + head) + needle.index(key)
    rest = n_bytes - len(episode)
    if tail == "text":
        more = "\n" + _slice(rng, text, rest - 1)
    elif tail == "qa":  # the question asked again (and answered) after more filler
        more = ""
        while len(more) < rest:
            more += FILLER * rng.randint(0, tail_filler) + QUESTION + " " + key
    else:
        raise ValueError(f"tail must be 'text' or 'qa', got {tail!r}")
    doc = episode + more[:max(rest, 0)]
    return doc, {"key": key, "depth": depth, "episode_bytes": len(episode),
                 "needle_at": needle_at, "answer_at": len(episode) - KEY_DIGITS}


def passkey_documents(n_docs: int, n_bytes: int, *, seed: int = 0, filler_text: float = 0.0,
                      min_episode: int | None = None, text: str | None = None,
                      tail: str = "text", text_docs: float = 0.0, tail_filler: int = 3
                      ) -> Iterator[tuple[str, dict]]:
    """`text_docs`: the share of documents that are plain other text (no episode)."""
    rng = random.Random(seed)
    text = other_text(seed=seed) if text is None else text
    for _ in range(n_docs):
        if rng.random() < text_docs:
            yield _slice(rng, text, n_bytes), {"key": None}
        else:
            yield passkey_document(rng, n_bytes, text, min_episode=min_episode,
                                   filler_text=filler_text, tail=tail,
                                   tail_filler=tail_filler)


COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def copy_document(rng: random.Random, n_bytes: int, min_len: int = 8, max_len: int = 40) -> str:
    """A random string (letters and digits, `min_len`..`max_len` bytes) repeated, ". " between
    the copies, cut to exactly `n_bytes`: a warm-up corpus on which a small model forms
    previous-token and copy (induction) heads in a few minutes, the circuit that retrieving a
    passkey needs and that the sparse key digits of passkey documents alone teach slowly."""
    s = "".join(rng.choice(COPY_ALPHABET) for _ in range(rng.randint(min_len, max_len)))
    return ((s + ". ") * (n_bytes // (len(s) + 2) + 1))[:n_bytes]


def _write_once(path: str, records: Iterable[dict]) -> str:
    """Write `records` as JSONL to `path` via a temporary file, unless `path` exists."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path


def write_copy_jsonl(path: str, n_docs: int, n_bytes: int, *, seed: int = 0) -> str:
    """Write `n_docs` copy documents (`copy_document`) as JSONL, unless `path` exists."""
    rng = random.Random(seed)
    return _write_once(path, ({"text": copy_document(rng, n_bytes)} for _ in range(n_docs)))


def write_jsonl(path: str, n_docs: int, n_bytes: int, *, seed: int = 0,
                filler_text: float = 0.0, min_episode: int | None = None, tail: str = "text",
                text_docs: float = 0.0, tail_filler: int = 3) -> str:
    """Write `n_docs` documents as JSONL ({"text": ...}), unless `path` already exists."""
    docs = passkey_documents(n_docs, n_bytes, seed=seed, filler_text=filler_text,
                             min_episode=min_episode, tail=tail, text_docs=text_docs,
                             tail_filler=tail_filler)
    return _write_once(path, ({"text": doc, **info} for doc, info in docs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--bytes", type=int, default=510, help="document length (seq_len - 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler-text", type=float, default=0.0)
    p.add_argument("--tail", choices=("text", "qa"), default="qa")
    p.add_argument("--text-docs", type=float, default=0.1)
    p.add_argument("--tail-filler", type=int, default=3)
    a = p.parse_args(argv)
    write_jsonl(a.out, a.docs, a.bytes, seed=a.seed, filler_text=a.filler_text, tail=a.tail,
                text_docs=a.text_docs, tail_filler=a.tail_filler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
