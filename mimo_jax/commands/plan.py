"""`mimo-jax plan`: per-device memory for a config on a mesh, and which chips it fits."""

from __future__ import annotations

import argparse

from mimo_jax.commands.common import dtype_arg, fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory of training/serving on a mesh")
    p.add_argument("--config", default="flash", help="flash | tiny | path to a HF directory")
    p.add_argument("--mesh", required=True, help='e.g. "data=1,fsdp=-1,expert=8,tensor=1"')
    p.add_argument("--devices", type=int, default=None,
                   help="number of chips (needed when the mesh has a -1 axis)")
    p.add_argument("--batch", type=int, required=True, help="global batch (sequences)")
    p.add_argument("--seq", type=int, required=True, help="sequence length")
    p.add_argument("--preset", default="fsdp_tensor_expert",
                   help="sharding preset: fsdp | fsdp_expert | fsdp_tensor_expert")
    p.add_argument("--remat", default="full", choices=["full", "none"])
    p.add_argument("--param-dtype", type=dtype_arg, default="float32", metavar="DTYPE",
                   help="stored (master) weights: f32 | bf16 | f16, any spelling (default f32); "
                        "compute is bfloat16")
    p.add_argument("--serve-weights", choices=["fp8", "bf16"], default=None,
                   help="also plan serving: weights kept as FP8 (load(..., keep_fp8=True)) or "
                        "bf16, plus the bf16 KV cache of --batch sequences of --seq tokens")
    p.add_argument("--contexts", default=None, metavar="N,N,...",
                   help="also a long-context serving table at these context lengths (e.g. "
                        "32768,131072,262144 or 32K,128K,256K): KV cache per device by layer "
                        "type against an all-global model of the same shape, with "
                        "--serve-weights (default fp8) weights and --batch sequences")
    p.add_argument("--chip", default="H200", help="chip the long-context table checks the fit on")
    p.set_defaults(func=run)


def parse_contexts(text: str) -> tuple[int, ...]:
    """ "32K,128K,256K" or "32768,131072" -> token counts (K = 1024)."""
    out = []
    for part in text.split(","):
        t = part.strip().upper()
        mult = 1024 if t.endswith("K") else 1
        t = t[:-1] if t.endswith("K") else t
        if not t.isdigit() or int(t) < 1:
            raise ValueError(f"--contexts wants positive lengths like 32K,128K; got {part!r}")
        out.append(int(t) * mult)
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    from mimo_jax import ModelConfig
    from mimo_jax.core.dtypes import jnp_dtype
    from mimo_jax.core.errors import CheckpointError
    from mimo_jax.parallel.plan import (
        CHIPS_GIB,
        format_long_context,
        format_plan,
        format_serving,
        plan_long_context,
        plan_memory,
        plan_serving,
    )
    from mimo_jax.sharding.mesh import mesh_shape
    from mimo_jax.sharding.rules import ShardingRules

    try:
        cfg = {"flash": ModelConfig.flash, "tiny": ModelConfig.tiny}.get(args.config)
        cfg = cfg() if cfg else ModelConfig.from_hf(args.config)
        devices = args.devices
        if devices is None:
            if "-1" in args.mesh:
                raise ValueError("give --devices when the mesh has a -1 axis")
            devices = 1
            for part in args.mesh.split(","):
                name, eq, size = part.partition("=")
                if not eq or not size.strip().lstrip("-").isdigit():
                    raise ValueError(f"--mesh wants AXIS=SIZE,... got {args.mesh!r}")
                devices *= int(size)
        shape = mesh_shape(args.mesh, devices)
        plan = plan_memory(cfg, shape, ShardingRules.preset(args.preset), batch=args.batch,
                           seq=args.seq, param_bytes=jnp_dtype(args.param_dtype).itemsize,
                           remat=args.remat)
        long_plan = None
        if args.contexts:
            if args.chip not in CHIPS_GIB:
                raise ValueError(f"unknown --chip {args.chip!r}; have {sorted(CHIPS_GIB)}")
            long_plan = plan_long_context(cfg, shape, ShardingRules.preset(args.preset),
                                          contexts=parse_contexts(args.contexts),
                                          batch=args.batch,
                                          weights=args.serve_weights or "fp8")
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        return fail("plan", e)
    print(f"config {args.config}, mesh {shape}, preset {args.preset}, batch {args.batch} x "
          f"seq {args.seq}, remat {args.remat}, {args.param_dtype} weights")
    print(format_plan(plan))
    if args.serve_weights:
        print(format_serving(plan_serving(cfg, shape, ShardingRules.preset(args.preset),
                                          batch=args.batch, context=args.seq,
                                          weights=args.serve_weights)))
    if long_plan is not None:
        print(format_long_context(long_plan, args.chip))
    return 0
