"""`mimo-jax info`: a config's shape, parameter counts, and a forward pass on the tiny preset."""

from __future__ import annotations

import argparse
import time

from mimo_jax.commands.common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model config, its parameter counts, run a forward")
    p.add_argument("--config", default="tiny", help="tiny | flash | path to a HF directory")
    p.add_argument("--no-forward", action="store_true", help="skip the forward pass")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mimo_jax import MiMo, ModelConfig, param_count
    from mimo_jax.core.errors import CheckpointError

    try:
        if args.config == "tiny":
            cfg = ModelConfig.tiny()
        elif args.config == "flash":
            cfg = ModelConfig.flash()
        else:
            cfg = ModelConfig.from_hf(args.config)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        return fail("info", e)
    counts = param_count(cfg)
    print(f"layers: {cfg.num_layers} ({cfg.layer_types.count('sliding')} sliding, "
          f"{cfg.layer_types.count('full')} full), MTP heads: {cfg.num_mtp_layers}")
    print(f"parameters: total {counts.total / 1e9:.3f}B, active {counts.active / 1e9:.3f}B, "
          f"per MTP layer {counts.per_mtp_layer / 1e9:.4f}B")
    if args.no_forward or args.config == "flash":
        return 0
    model = MiMo(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 64), 0, cfg.vocab_size)
    fwd = nnx.jit(lambda m, x: m(x))
    t0 = time.perf_counter()
    out = fwd(model, ids)
    jax.block_until_ready(out.logits)
    t1 = time.perf_counter()
    out = fwd(model, ids)
    jax.block_until_ready(out.logits)
    t2 = time.perf_counter()
    print(f"forward [2, 64]: logits {out.logits.shape}, MTP logits {out.mtp_logits.shape}, "
          f"compile+run {t1 - t0:.2f}s, run {1e3 * (t2 - t1):.1f}ms, "
          f"finite={bool(jnp.isfinite(out.logits).all())}")
    return 0
