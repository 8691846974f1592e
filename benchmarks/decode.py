"""Decode throughput: plain vs MTP speculative decoding, FP8 vs bf16 weights, sharded over 8
simulated devices, ours vs transformers, KV-cache bytes.

    .venv/bin/python benchmarks/decode.py [--steps 150] [--new-tokens 64] [--quick]

1. A tiny model (ModelConfig.tiny: byte vocabulary, 8 layers, 3 MTP heads) trained here with a
   short optax loop (next-token + MTP losses) on Python stdlib sources; batch 1, 4 and 16,
   greedy, plain vs speculative K = 1, 2, 3: tokens/s (compile excluded, median of 5 runs
   after a warm-up; batch 1 over 4 different prompts), acceptance length and speed-up per K.
   The same at batch 1 and 4 for a ~50M-parameter config with random weights. The goal
   (speed-up >= 0.6 x acceptance length at K = 3, batch 1) compares speed-up / AL, which is
   the plain step's time over a speculative round's time whatever the acceptance (a round
   yields AL tokens): random drafts (AL = 1) measure it directly on the 50M config.
2. FP8 weights kept in FP8 (`quantize_model`, the release's block quantisation) vs bf16, for
   both models: tokens/s, weight bytes, tokens agreeing with the bf16 model.
3. Sharded generation on 8 simulated CPU devices (a subprocess): tokens/s, parameter and KV
   bytes per device, tokens equal to one device; bf16 and FP8 weights.
4. Ours vs transformers `generate` (greedy, eager, torch CPU) on the same small random model
   written with save_pretrained and read with mimo_jax.load; both sides timed as the wall
   time of the whole generate call (setup included), median of 5 after a warm-up.
5. KV-cache bytes of the flash config (bf16, batch 1) at 4k/32k/256k vs all-global attention.
Writes benchmarks/results/decode.{md,json}. Simulated devices share the host's cores: the
sharded rows show that sharded decoding runs and what each device holds, not a speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mimo_jax
from mimo_jax import MiMo, ModelConfig, param_count
from mimo_jax.checkpoint.fp8_keep import quantize_model
from mimo_jax.inference import cache_bytes, generate, tree_bytes, with_dtype
from mimo_jax.model.config import AttentionSpec
from mimo_jax.model.fp8_linear import fp8_weights

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def stdlib_bytes(limit: int = 2_000_000) -> np.ndarray:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = b"".join(open(f, "rb").read() for f in files)[:limit]
    return np.frombuffer(data, np.uint8).astype(np.int32)


def train_tiny(steps: int, seq: int = 128, batch: int = 8) -> tuple[MiMo, np.ndarray, list]:
    cfg = ModelConfig.tiny()
    model = MiMo(cfg, rngs=nnx.Rngs(0))
    data = stdlib_bytes()
    split = int(len(data) * 0.95)
    train, held = data[:split], data[split:]
    opt = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, ids):
        def loss_fn(model):
            out = model(ids)
            lp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
            main = -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))
            mtp = 0.0
            for k in range(out.mtp_logits.shape[0]):
                lq = jax.nn.log_softmax(out.mtp_logits[k, :, : -(k + 2)].astype(jnp.float32))
                mtp -= jnp.mean(jnp.take_along_axis(lq, ids[:, k + 2 :, None], -1))
            return main + 0.3 * mtp, main

        (_, main), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return main

    rng = np.random.default_rng(0)
    log = []
    t0 = time.perf_counter()
    for i in range(steps):
        starts = rng.integers(0, len(train) - seq, batch)
        ids = jnp.asarray(np.stack([train[s : s + seq] for s in starts]))
        loss = step(model, opt, ids)
        if i % 25 == 0 or i == steps - 1:
            log.append((i, float(loss), time.perf_counter() - t0))
            print(f"  train step {i}: loss {float(loss):.3f} ({time.perf_counter() - t0:.0f}s)")
    return model, held, log


def config_50m() -> ModelConfig:
    return ModelConfig.tiny(
        hidden_size=512, num_layers=12, intermediate_size=1536, moe_intermediate_size=384,
        num_experts=8, num_experts_per_tok=2,
        full_attention=AttentionSpec(8, 2, 64, 64, 5e6, 0.25, False, None),
        sliding_attention=AttentionSpec(8, 4, 64, 64, 1e4, 0.25, True, 65),
        max_position_embeddings=4096,
    )


REPEATS = 5  # timed runs per row after one warm-up; the median is reported


def timed_generate(model, prompts, **kw):
    """One warm-up (compiles once; executables are cached), then REPEATS timed runs: the output
    of the run with the median tokens/s. Tokens are identical across runs (greedy)."""
    generate(model, prompts, **kw)
    outs = sorted((generate(model, prompts, **kw) for _ in range(REPEATS)),
                  key=lambda o: o.tokens_per_second)
    return outs[len(outs) // 2]


def held_prompts(held, b, prompt_len=48, seed=1):
    starts = np.random.default_rng(seed + b).integers(0, len(held) - prompt_len, b)
    return [held[s : s + prompt_len].tolist() for s in starts]


def decode_table(name, model, held, batches, new_tokens, ks=(0, 1, 2, 3), batch1_prompts=4):
    """Per batch size and K: tokens/s (sum of new tokens / sum of median seconds), acceptance
    length (tokens per verify round). Batch 1 runs `batch1_prompts` different prompts one after
    another, since one prompt's acceptance says little."""
    rows = []
    for b in batches:
        prompt_sets = [held_prompts(held, b, seed=1 + 100 * i)
                       for i in range(batch1_prompts if b == 1 else 1)]
        base = None
        for k in ks:
            outs = [timed_generate(model, p, max_new_tokens=new_tokens, speculative=k,
                                   stop_tokens=[]) for p in prompt_sets]
            tokens = sum(o.num_new_tokens for o in outs)
            tps = tokens / sum(o.num_new_tokens / o.tokens_per_second for o in outs)
            rounds = sum(o.num_new_tokens / o.acceptance_length for o in outs) if k else None
            al = tokens / rounds if k else None
            seqs = [t for o in outs for t in o.tokens]
            if k == 0:
                base, base_tokens = tps, seqs
            same = seqs == base_tokens
            speedup = tps / base
            rows.append(dict(model=name, batch=b, speculative=k, tokens_per_second=tps,
                             acceptance_length=al, speedup=speedup,
                             speedup_over_al=None if al is None else speedup / al,
                             same_tokens_as_plain=same, new_tokens=tokens,
                             prompts=len(prompt_sets) * b,
                             row_acceptance_lengths=None if not k else
                             [a for o in outs for a in o.row_acceptance_lengths]))
            print(f"  {name} batch {b} K={k}: {tps:.1f} tok/s, AL {al}, "
                  f"speedup {speedup:.2f}, same tokens {same}", flush=True)
    return rows


def vs_transformers(batches, new_tokens, prompt_len=32):
    import torch
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = MiMoV2FlashConfig(
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        v_head_dim=24, n_routed_experts=8, num_experts_per_tok=2, sliding_window=65,
        max_position_embeddings=2048,
    )
    hf = MiMoV2FlashForCausalLM(hf_cfg).eval()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = mimo_jax.load(d, dtype="float32")
    for b in batches:
        ids = torch.randint(0, 512, (b, prompt_len), generator=torch.Generator().manual_seed(b))
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            hf.generate(ids, **kw)  # warm-up
            hf_s = median_wall(hf.generate, ids, **kw)
            ref = hf.generate(ids, **kw)
        hf_tps = b * new_tokens / hf_s
        prompts = ids.numpy().tolist()
        gkw = dict(max_new_tokens=new_tokens, stop_tokens=[])
        generate(ours, prompts, **gkw)  # warm-up (compiles)
        ours_s = median_wall(generate, ours, prompts, **gkw)
        out = generate(ours, prompts, **gkw)
        ours_tps = b * new_tokens / ours_s
        match = float(np.mean(np.asarray(out.tokens) == ref[:, prompt_len:].numpy()))
        rows.append(dict(batch=b, ours_tokens_per_second=ours_tps,
                         transformers_tokens_per_second=hf_tps, ratio=ours_tps / hf_tps,
                         greedy_token_agreement=match, torch_threads=torch.get_num_threads(),
                         transformers_attention=hf.config._attn_implementation,
                         transformers_experts=getattr(hf.config, "_experts_implementation",
                                                      None)))
        print(f"  vs transformers batch {b}: ours {ours_tps:.1f} tok/s, "
              f"transformers {hf_tps:.1f} tok/s, x{ours_tps / hf_tps:.1f}, "
              f"greedy agreement {match:.3f}")
    return rows


def median_wall(fn, *args, **kw) -> float:
    """Median wall seconds of REPEATS calls fn(*args, **kw) (the whole call: setup included)."""
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn(*args, **kw)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def kv_bytes():
    flash = ModelConfig.flash()
    rows = []
    for n in (4096, 32768, 262144):
        ours = cache_bytes(flash, 1, n)
        glob_ = cache_bytes(flash, 1, n, all_global=True)
        rows.append(dict(seq_len=n, hybrid_bytes=ours["total"], sliding_bytes=ours["sliding"],
                         mtp_bytes=ours["mtp"], all_global_bytes=glob_["total"],
                         ratio=glob_["total"] / ours["total"]))
    return rows


def weight_bytes(model) -> int:
    """Bytes of a model's weights on device 0 (its shard when sharded)."""
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model)):
        x = var.get_value()
        total += x.addressable_shards[0].data.nbytes
    return total


def fp8_table(name, model_bf16, held, batches, new_tokens):
    """bf16 weights vs the same weights quantised to FP8 and kept in FP8."""
    model_fp8 = quantize_model(model_bf16)
    rows = []
    for b in batches:
        prompts = held_prompts(held, b)
        ref = timed_generate(model_bf16, prompts, max_new_tokens=new_tokens, stop_tokens=[])
        out = timed_generate(model_fp8, prompts, max_new_tokens=new_tokens, stop_tokens=[])
        agree = float(np.mean(np.asarray(out.tokens) == np.asarray(ref.tokens)))
        for fmt, m, o in (("bf16", model_bf16, ref), ("fp8", model_fp8, out)):
            rows.append(dict(model=name, batch=b, weights=fmt,
                             tokens_per_second=o.tokens_per_second,
                             weight_bytes=weight_bytes(m),
                             fp8_weights=len(fp8_weights(m)),
                             token_agreement_with_bf16=1.0 if fmt == "bf16" else agree))
            print(f"  {name} batch {b} {fmt}: {o.tokens_per_second:.1f} tok/s, weights "
                  f"{weight_bytes(m) / 2**20:.1f} MiB, agreement "
                  f"{rows[-1]['token_agreement_with_bf16']:.3f}")
    return rows


def config_sharded() -> ModelConfig:
    """ModelConfig.tiny (float32) with 4 KV heads on every layer, so tensor=2 and 4 divide
    them."""
    return ModelConfig.tiny(full_attention=AttentionSpec(8, 4, 32, 24, 5e6, 0.25, False, None),
                            sliding_attention=AttentionSpec(8, 4, 32, 24, 1e4, 0.25, True, 65))


def sharded_worker(out_path: str, new_tokens: int) -> None:
    """Runs in a subprocess started with 8 simulated devices. Float32 compute, as in the
    tests, where sharded greedy tokens must equal one device's exactly; FP8 rows are compared
    with the same FP8 weights on one device."""
    from mimo_jax import sharding as sh
    from mimo_jax.inference.generate import new_cache
    from mimo_jax.parallel import create_sharded

    assert jax.device_count() == 8, jax.device_count()
    cfg = config_sharded()
    data = stdlib_bytes(200_000)
    rows = []
    single = {"float32": MiMo(cfg, rngs=nnx.Rngs(0))}
    single["fp8"] = quantize_model(single["float32"])
    kw = dict(max_new_tokens=new_tokens, stop_tokens=[], speculative=2)
    for b in (1, 8):
        prompts = held_prompts(data, b)
        want = {}
        for fmt, m in single.items():
            want[fmt] = timed_generate(m, prompts, **kw)
            rows.append(dict(mesh="1 device", batch=b, weights=fmt,
                             tokens_per_second=want[fmt].tokens_per_second,
                             param_bytes_per_device=weight_bytes(m),
                             kv_bytes_per_device=tree_bytes(new_cache(cfg, b, 128, 2, None)),
                             token_agreement=1.0))
        for spec in ("fsdp=8", "data=2,expert=2,tensor=2", "expert=2,tensor=4"):
            mesh, rules = sh.make_mesh(spec), sh.ShardingRules.preset()
            model = create_sharded(cfg, mesh, rules, seed=0)
            for fmt in ("float32", "fp8"):
                m = model if fmt == "float32" else quantize_model(model, (mesh, rules))
                out = timed_generate(m, prompts, rules=rules, **kw)
                cache = new_cache(cfg, b, 128, 2, (mesh, rules))
                kv = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(cache))
                agree = float(np.mean(np.asarray(out.tokens) == np.asarray(want[fmt].tokens)))
                rows.append(dict(mesh=spec, batch=b, weights=fmt,
                                 tokens_per_second=out.tokens_per_second,
                                 param_bytes_per_device=weight_bytes(m),
                                 kv_bytes_per_device=kv, token_agreement=agree))
                print(f"  {spec} batch {b} {fmt}: {out.tokens_per_second:.1f} tok/s, "
                      f"params/device {rows[-1]['param_bytes_per_device'] / 2**20:.1f} MiB, "
                      f"tokens equal to one device {agree:.3f}", flush=True)
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)


def sharded_rows(new_tokens: int) -> list[dict]:
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "sharded.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--sharded-worker", out,
                        "--new-tokens", str(new_tokens)], env=env, check=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true",
                    help="batch 1 only; skip the 50M config and the sharded rows")
    ap.add_argument("--no-transformers", action="store_true",
                    help="skip the transformers comparison (e.g. on an accelerator host)")
    ap.add_argument("--no-sharded", action="store_true", help="skip the sharded rows")
    ap.add_argument("--name", default="decode", help="results file stem (default: decode)")
    ap.add_argument("--sharded-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sharded_worker:
        sharded_worker(args.sharded_worker, args.new_tokens)
        return
    batches = [1] if args.quick else [1, 4, 16]
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    print("training the tiny model (optax loop in this script, stdlib sources as bytes)")
    tiny, held, train_log = train_tiny(args.steps)
    results = {"train_log": train_log, "decode": [], "train_steps": args.steps}
    results["decode"] += decode_table("tiny-trained", tiny, held, batches, args.new_tokens)
    tiny_bf16 = with_dtype(tiny, "bf16")
    results["fp8"] = fp8_table("tiny-trained", tiny_bf16, held, batches[:2], args.new_tokens)
    if not args.quick:
        cfg = config_50m()
        print(f"~50M config: {param_count(cfg).total_with_mtp / 1e6:.1f}M parameters (random)")
        big = MiMo(cfg, rngs=nnx.Rngs(0))
        results["decode"] += decode_table("50M-random", big, held, batches[:2], args.new_tokens)
        results["params_50m"] = param_count(cfg).total_with_mtp
        results["fp8"] += fp8_table("50M-random", with_dtype(big, "bf16"), held, [1],
                                    args.new_tokens)
        if not args.no_sharded:
            print("sharded generation on 8 simulated devices (subprocess)")
            results["sharded"] = sharded_rows(args.new_tokens // 2)
    goal = [d for d in results["decode"] if d["model"] == "50M-random" and d["batch"] == 1
            and d["speculative"] == 3]
    results["goal_k3_batch1_50m"] = (
        dict(speedup=goal[0]["speedup"], acceptance_length=goal[0]["acceptance_length"],
             met=goal[0]["speedup"] >= 0.6 * goal[0]["acceptance_length"]) if goal else None)
    results["vs_transformers"] = ([] if args.no_transformers else
                                  vs_transformers(batches[:1] + [8], args.new_tokens))
    results["kv_cache_bytes_flash_bf16_batch1"] = kv_bytes()
    results["meta"] = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), nproc=os.cpu_count(),
        cpu=_cpu(), python=platform.python_version(), jax=jax.__version__,
        flax=__import__("flax").__version__, torch=_version("torch"),
        transformers=_version("transformers"), new_tokens=args.new_tokens,
        backend=jax.default_backend(), device=jax.devices()[0].device_kind,
        seconds=time.perf_counter() - t_start, loadavg=os.getloadavg(),
        loadavg_start=load_start,
    )
    os.makedirs(RESULTS, exist_ok=True)
    _write(os.path.join(RESULTS, f"{args.name}.json"),
           json.dumps(results, indent=1, default=float))
    md = to_markdown(results)
    _write(os.path.join(RESULTS, f"{args.name}.md"), md)
    print(md)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "-"


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # never leave a half-written result


def to_markdown(r) -> str:
    m = r["meta"]
    out = [f"# Decode benchmark ({m['date']})", "",
           f"Machine: {m.get('backend', 'cpu')} ({m.get('device', 'cpu')}), "
           f"{m['nproc']} CPUs, {m['cpu']}, load average "
           f"{m.get('loadavg_start', m['loadavg'])[0]:.1f} at the start, {m['loadavg'][0]:.1f} "
           f"at the end (shared machine); jax {m['jax']}, flax {m['flax']}, torch {m['torch']}, "
           f"transformers {m['transformers']}. {m['new_tokens']} new tokens per row, greedy, "
           "compile excluded; every tokens/s is the median of 5 runs after a warm-up; batch 1 "
           "rows run 4 different prompts one at a time.", "",
           f"Tiny model trained for {r['train_steps']} optax steps in the script "
           f"(final train loss {r['train_log'][-1][1]:.2f} nats/byte).", "",
           "| model | batch | K | tokens/s | acceptance length | speedup | speedup / AL "
           "| same tokens |",
           "|---|---|---|---|---|---|---|---|"]
    for d in r["decode"]:
        al = "-" if d["acceptance_length"] is None else f"{d['acceptance_length']:.2f}"
        sa = "-" if d["speedup_over_al"] is None else f"{d['speedup_over_al']:.2f}"
        out.append(f"| {d['model']} | {d['batch']} | {d['speculative']} | "
                   f"{d['tokens_per_second']:.1f} | {al} | {d['speedup']:.2f} | {sa} | "
                   f"{d['same_tokens_as_plain']} |")
    goal = r.get("goal_k3_batch1_50m")
    if goal:
        out += ["", f"Goal (K = 3, batch 1, ~50M config): speed-up {goal['speedup']:.2f} vs "
                f"0.6 x acceptance length = {0.6 * goal['acceptance_length']:.2f}: "
                f"{'met' if goal['met'] else 'NOT met'}. Speed-up / AL is a speculative round's "
                "cost relative to a plain step (a round yields AL tokens), so the random "
                "model's rejected drafts (AL = 1) measure it directly."]
    out += ["", "FP8: the release's block quantisation (E4M3 + 128x128 scales) of the bf16 "
            "weights, kept in FP8 and dequantised in each matmul; it is a slightly different "
            "model, so greedy tokens can differ where logits are close (random weights). On "
            "CPU, XLA materialises each dequantised weight before its matmul (nothing to fuse "
            "into), so FP8 costs time here and only saves memory; a single row's MoE step "
            "dequantises only the experts it uses.", "",
            "| FP8 kept in FP8 vs bf16 | batch | weights | tokens/s | weight bytes | "
            "FP8 weights | greedy tokens equal to bf16 |", "|---|---|---|---|---|---|---|"]
    for d in r.get("fp8", []):
        out.append(f"| {d['model']} | {d['batch']} | {d['weights']} | "
                   f"{d['tokens_per_second']:.1f} | {d['weight_bytes'] / 2**20:.2f} MiB | "
                   f"{d['fp8_weights']} | {d['token_agreement_with_bf16']:.3f} |")
    if r.get("sharded"):
        out += ["", "Sharded generation (8 simulated CPU devices sharing the host's 2 cores, "
                "so tokens/s shows overheads, not a speed-up; speculative K = 2, float32 "
                "compute, FP8 rows dequantise to float32; bytes are device 0's shard):", "",
                "| mesh | batch | weights | tokens/s | params / device | KV / device | "
                "greedy tokens equal to 1 device |", "|---|---|---|---|---|---|---|"]
        for d in r["sharded"]:
            out.append(f"| {d['mesh']} | {d['batch']} | {d['weights']} | "
                       f"{d['tokens_per_second']:.1f} | "
                       f"{d['param_bytes_per_device'] / 2**20:.2f} MiB | "
                       f"{d['kv_bytes_per_device'] / 2**10:.0f} KiB | "
                       f"{d['token_agreement']:.3f} |")
    vt = r["vs_transformers"]
    if vt:
        out += ["", "Ours vs transformers: both sides timed as the wall time of the whole "
                "generate call, median of 5 after a warm-up; transformers eager, attention "
                f"`{vt[0].get('transformers_attention')}`, experts "
                f"`{vt[0].get('transformers_experts')}`, torch threads "
                f"{vt[0].get('torch_threads')}."]
    out += ["", "| ours vs transformers generate (small random config) | batch | ours tok/s | "
            "transformers tok/s | ratio | greedy agreement |", "|---|---|---|---|---|---|"]
    for d in vt:
        out.append(f"| | {d['batch']} | {d['ours_tokens_per_second']:.1f} | "
                   f"{d['transformers_tokens_per_second']:.1f} | {d['ratio']:.1f}x | "
                   f"{d['greedy_token_agreement']:.3f} |")
    out += ["", "| KV cache, flash config, bf16, batch 1 | hybrid (incl. 3 MTP heads) | "
            "sliding part | all-global | all-global / hybrid |", "|---|---|---|---|---|"]
    for d in r["kv_cache_bytes_flash_bf16_batch1"]:
        out.append(f"| {d['seq_len']} tokens | {d['hybrid_bytes'] / 2**20:.1f} MiB | "
                   f"{d['sliding_bytes'] / 2**20:.1f} MiB | {d['all_global_bytes'] / 2**20:.1f} MiB"
                   f" | {d['ratio']:.2f}x |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
