"""`mimo-jax generate`: sample from a checkpoint, optionally with MTP speculative decoding."""

from __future__ import annotations

import argparse
import json
import os

from mimo_jax.commands.common import dtype_arg, fail
from mimo_jax.core import logs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache, MTP drafts)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint path (anything mimo_jax.load reads)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="draft K tokens per step with the first K MTP heads (0 = off)")
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: fitted)")
    p.add_argument("--dtype", type=dtype_arg, default=None, metavar="DTYPE",
                   help="parameter/compute dtype: bf16 | f32 | f16, any spelling "
                        "(default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _recorded_spec(path: str) -> dict | None:
    """The tokenizer spec a training run recorded in its checkpoint's `meta` item (a work
    directory's latest step, or one step directory), if any."""
    import orbax.checkpoint as ocp
    from etils import epath

    from mimo_jax.checkpoint.orbax_io import training_step_dir
    from mimo_jax.core.errors import CheckpointError

    try:
        step = training_step_dir(path)
    except CheckpointError:
        return None
    if step is None or not os.path.isdir(os.path.join(step, "meta")):
        return None
    try:  # Orbax's own reader of the JsonSave item, not its file layout
        meta = ocp.JsonCheckpointHandler().restore(epath.Path(step) / "meta")
    except (OSError, ValueError):
        return None
    spec = meta.get("tokenizer") if isinstance(meta, dict) else None
    return spec if isinstance(spec, dict) else None


def resolve_tokenizer(path: str, model=None):
    """The checkpoint's tokenizer: the spec its training run recorded, else its
    tokenizer.json, else the byte tokenizer."""
    from mimo_jax.data.tokenizer import load_tokenizer

    base = path if os.path.isdir(path) else os.path.dirname(path)
    spec = _recorded_spec(base)
    local = os.path.join(base, "tokenizer.json")
    if spec and spec.get("kind") == "hf" and not os.path.exists(str(spec.get("path"))) \
            and os.path.isfile(local):
        spec = {**spec, "path": local}  # a moved work directory: the recorded path is stale
    if spec is None and os.path.isfile(os.path.join(base, "tokenizer.json")):
        spec = {"kind": "hf", "path": os.path.join(base, "tokenizer.json"), "bos": None,
                "eos": None}
    tok = load_tokenizer(spec)
    if model is not None and tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} ids but the model vocabulary is "
            f"{model.cfg.vocab_size}: this checkpoint was not trained with it"
        )
    return tok


def run(args: argparse.Namespace) -> int:
    import mimo_jax
    from mimo_jax.inference import generate

    try:
        kwargs = {} if args.dtype is None else {"dtype": args.dtype}
        model = mimo_jax.load(args.checkpoint, **kwargs)
        if args.speculative and not len(model.mtp):
            raise ValueError(
                f"--speculative {args.speculative}: {args.checkpoint} has no MTP weights "
                "(no model.mtp.layers.* tensors), so there is no draft model"
            )
        tok = resolve_tokenizer(args.checkpoint, model)
        out = generate(
            model, [args.prompt], tokenizer=tok, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            speculative=args.speculative, max_len=args.max_len,
        )
    except (ValueError, FileNotFoundError, mimo_jax.CheckpointError) as e:
        return fail("generate", e)
    if args.json:
        print(json.dumps({
            "text": out.text[0],
            "tokens": out.tokens[0],
            "acceptance_length": out.acceptance_length,
            "tokens_per_second": out.tokens_per_second,
            "num_new_tokens": out.num_new_tokens,
            "compile_seconds": out.compile_seconds,
        }))
    else:
        print(args.prompt + out.text[0])
        extra = "" if out.acceptance_length is None else (
            f", acceptance length {out.acceptance_length:.2f}")
        logs.info(f"[{out.num_new_tokens} tokens, {out.tokens_per_second:.1f} tokens/s{extra}, "
                  f"compile {out.compile_seconds:.1f}s]")
    return 0
