"""`mimo-jax plan`: per-device memory for a config on a mesh, and which chips it fits."""

from __future__ import annotations

import argparse


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
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored (master) weights; compute is bfloat16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mimo_jax import ModelConfig
    from mimo_jax.parallel.plan import format_plan, plan_memory
    from mimo_jax.sharding.mesh import mesh_shape
    from mimo_jax.sharding.rules import ShardingRules

    cfg = {"flash": ModelConfig.flash, "tiny": ModelConfig.tiny}.get(args.config)
    cfg = cfg() if cfg else ModelConfig.from_hf(args.config)
    devices = args.devices
    if devices is None:
        if "-1" in args.mesh:
            raise SystemExit("plan: give --devices when the mesh has a -1 axis")
        devices = 1
        for part in args.mesh.split(","):
            devices *= int(part.split("=")[1])
    shape = mesh_shape(args.mesh, devices)
    plan = plan_memory(cfg, shape, ShardingRules.preset(args.preset), batch=args.batch,
                       seq=args.seq, param_bytes=4 if args.param_dtype == "float32" else 2,
                       remat=args.remat)
    print(f"config {args.config}, mesh {shape}, preset {args.preset}, batch {args.batch} x "
          f"seq {args.seq}, remat {args.remat}, {args.param_dtype} weights")
    print(format_plan(plan))
    return 0
