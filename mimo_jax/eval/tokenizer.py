"""Tokenizers with lm-evaluation-harness conventions for the `mimo-jax` lm-eval model.

lm-eval's `hf` backend encodes with the tokenizer's own special-token rule (the post-processor
of `tokenizer.json`: BOS for Llama-style tokenizers, nothing for Qwen/MiMo-style ones), scores
an empty context after `prefix_token_id` (BOS, else EOS) and decodes generations with special
tokens skipped. `EvalTokenizer` does the same from a `tokenizer.json` through the `tokenizers`
package, so the two backends tokenise identically without transformers or torch.

Where a checkpoint's tokenizer comes from (`resolve_tokenizer`): an explicit path; the spec a
training run recorded in its checkpoint (`meta`); a `tokenizer.json` beside the checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from mimo_jax.data.tokenizer import ByteTokenizer, load_tokenizer


class EvalTokenizer:
    """Text <-> ids. `encode(text, add_special_tokens)` and `decode(ids, skip_special_tokens)`
    follow transformers' fast tokenizers; `bos_id`/`eos_id` may be None."""

    def __init__(self, *, name: str, vocab_size: int, bos_id: int | None, eos_id: int | None,
                 encode_fn, decode_fn, spec: dict[str, Any], bos_text: str | None = None,
                 add_special_default: bool = True) -> None:
        self.name = name
        self.spec = spec  # the training-pipeline spec (`mimo_jax.data.load_tokenizer`)
        self.vocab_size = int(vocab_size)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.bos_text = bos_text
        self._encode, self._decode = encode_fn, decode_fn
        self.add_special_default = add_special_default

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        add = self.add_special_default if add_special_tokens is None else add_special_tokens
        return [int(i) for i in self._encode(text, bool(add))]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._decode([int(i) for i in ids], bool(skip_special_tokens))

    def __repr__(self) -> str:
        return (f"EvalTokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id})")


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _config_token_id(folder: str, key: str) -> int | None:
    """bos_token_id / eos_token_id from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        value = _read_json(os.path.join(folder, name)).get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def hf_tokenizer(path: str, *, model_dir: str | None = None) -> EvalTokenizer:
    """An `EvalTokenizer` from a `tokenizer.json` (or its folder). BOS/EOS come from the
    `tokenizer_config.json` beside it, else the model's (generation_)config.json ids."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - a dependency of the eval extra
        raise ImportError("reading tokenizer.json needs the 'tokenizers' package") from e
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:
        raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
    folder = os.path.dirname(os.path.abspath(file))
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))

    def special(kind: str) -> tuple[int | None, str | None]:
        text = _token_text(config.get(f"{kind}_token"))
        if text is not None:
            idx = tok.token_to_id(text)
            if idx is None:
                raise ValueError(f"{kind}_token {text!r} of {folder}/tokenizer_config.json is not "
                                 f"in {file}")
            return int(idx), text
        for where in (folder, model_dir):
            idx = _config_token_id(where, f"{kind}_token_id") if where else None
            if idx is not None and idx < tok.get_vocab_size(with_added_tokens=True):
                return idx, tok.id_to_token(idx)
        return None, None

    bos_id, bos_text = special("bos")
    eos_id, eos_text = special("eos")
    add_special = config.get("add_bos_token")

    def encode(text: str, add: bool) -> list[int]:
        ids = tok.encode(text, add_special_tokens=add).ids
        # tokenizer_config's add_bos_token=True asks for BOS even without a post-processor.
        if add and add_special is True and bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        return ids

    return EvalTokenizer(
        name=file, vocab_size=tok.get_vocab_size(with_added_tokens=True), bos_id=bos_id,
        eos_id=eos_id, bos_text=bos_text, encode_fn=encode,
        decode_fn=lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
        spec={"kind": "hf", "path": os.path.abspath(file), "bos": bos_text, "eos": eos_text},
    )


def spec_tokenizer(spec: dict[str, Any] | None) -> EvalTokenizer:
    """An `EvalTokenizer` from a training tokenizer spec (`mimo_jax.data.load_tokenizer`).

    Training prepends BOS to every document, so `add_special_tokens` prepends it here too."""
    base = load_tokenizer(spec)
    specials = {i for i in (base.bos_id, base.eos_id, base.pad_id) if i is not None}

    def encode(text: str, add: bool) -> list[int]:
        ids = [int(i) for i in base.encode(text)]
        return [base.bos_id, *ids] if add and base.bos_id is not None else ids

    def decode(ids: list[int], skip: bool) -> str:
        if isinstance(base, ByteTokenizer) or skip:
            ids = [i for i in ids if i not in specials]
        return base.decode(ids)

    name = base.spec.get("path") or base.spec.get("kind", "byte")
    bos_text = None if base.bos_id is None else base.decode([base.bos_id]) or None
    return EvalTokenizer(name=str(name), vocab_size=base.vocab_size, bos_id=base.bos_id,
                         eos_id=base.eos_id, bos_text=bos_text, encode_fn=encode,
                         decode_fn=decode, spec=dict(base.spec))


def recorded_spec(path: str) -> dict | None:
    """The tokenizer spec a training run recorded in its checkpoint `meta` item (a work
    directory's latest step, or one step directory), if any."""
    dirs = [path]
    ckpts = os.path.join(path, "checkpoints")
    steps = [d for d in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if d.isdigit()]
    if steps:
        dirs.insert(0, os.path.join(ckpts, max(steps, key=int)))
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, "meta", "*"))):
            meta = _read_json(f)
            if isinstance(meta.get("tokenizer"), dict):
                return meta["tokenizer"]
    return None


def resolve_tokenizer(checkpoint: str | None, tokenizer: str | None = None) -> EvalTokenizer:
    """The tokenizer to evaluate `checkpoint` with.

    `tokenizer`: a tokenizer.json or its folder, or "byte" (the built-in byte tokenizer);
    default: the spec a training run recorded, else a tokenizer.json beside the checkpoint.
    """
    model_dir = None
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        model_dir = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    if tokenizer is not None:
        tokenizer = os.fspath(tokenizer)
        if tokenizer == "byte":
            return spec_tokenizer({"kind": "byte"})
        return hf_tokenizer(tokenizer, model_dir=model_dir)
    if model_dir is None:
        raise ValueError("no tokenizer: pass tokenizer=PATH (a tokenizer.json or its folder)")
    spec = recorded_spec(model_dir)
    if spec is not None:
        return spec_tokenizer(spec)
    for candidate in (model_dir, os.path.dirname(os.path.abspath(model_dir))):
        if os.path.isfile(os.path.join(candidate, "tokenizer.json")):
            return hf_tokenizer(candidate, model_dir=model_dir)
    raise FileNotFoundError(
        f"no tokenizer found for {checkpoint}: no tokenizer.json beside it and no tokenizer "
        "recorded by a training run; pass tokenizer=PATH (a tokenizer.json or its folder) "
        "or tokenizer=byte"
    )
