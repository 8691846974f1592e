"""The report's context extension (§3.2 "Long Context Extension", spec paper.md §1.6-2):
pre-train at 32K with the global layers' RoPE base at 640K, then continue at 256K with that
base raised to 5M; the sliding layers keep base 10K throughout, and there is no YaRN/NTK
scaling. One run, two training stages: stage 2 resumes stage 1's last checkpoint with the new
base, length and schedule (`TrainConfig.stages`).

From the report (spec paper.md §1.2, §1.6, §2): base 640K -> 5M on global layers only; Stage-3
(256K) lr cosine 3.0e-5 -> 1.0e-5 (a tenth of the 3.2e-4 peak), batch 256 x 256K = the same
~67M tokens per step as 2048 x 32K, expert-bias rate 1e-3 -> 1e-5, MTP weight 0.1.
Guesses, marked as such: the extension's length as a share of training (the report spends
~1T of 27T tokens at 256K, we give stage 2 5% of stage 1's steps), the tiny scale's lengths
(512 -> 2048, 4x rather than the release's 8x) and the TPU meshes of stage 2.

The sweep compares the report's recipe with the same extension keeping the 640K base (does
raising the base matter for retrieval at the new length?). At the tiny scale the rotary part
is 8 dims (head_dim 32 x 0.25), so expect little difference there; the TPU scales have the
release's 64 rotary dims.
"""

from experiments.lib import scales
from experiments.lib.spec import EvalSpec, Experiment, Scaled, Sweep

BASE_32K, BASE_256K, BASE_SWA = 640_000.0, 5_000_000.0, 10_000.0  # report §3.2


def _stage2(end: int, length: int, batch: int, seq: int, lr: float, end_lr: float,
            **more) -> dict:
    """The 256K stage (steps end-length..end): the report's Stage-3 settings on top of
    stage 1, its cosine lr -> end_lr over the stage."""
    return {"steps": end, "batch_size": batch, "seq_len": seq, "lr": lr, "end_lr": end_lr,
            "warmup_steps": 0, "decay_steps": length, "bias_gamma": 1e-5, "mtp_lambda": 0.1,
            "model.max_position_embeddings": seq,
            "model.full_attention": {"rope_theta": BASE_256K}, **more}


def _scale(base, *, seq, batch, steps, stage2_steps, stage2_batch, grad_accum=1,
           stage2_accum=1, mesh=None, stage2_mesh=None, lr=None, ratio=8, **train):
    """`base` at stage 1 (`seq` tokens) with a stage 2 at `ratio` x seq (the release: 8x)."""
    lr = base.train.get("lr", 3e-3) if lr is None else lr
    stage2 = _stage2(steps + stage2_steps, stage2_steps, stage2_batch, ratio * seq, lr / 10,
                     lr / 30, grad_accum=stage2_accum)
    if stage2_mesh is not None:
        stage2["mesh"] = stage2_mesh
    return base.with_(
        seq_len=seq, batch_size=batch, steps=steps,
        mesh=base.mesh if mesh is None else mesh,
        train={"grad_accum": grad_accum, "model.max_position_embeddings": seq,
               "stages": [stage2], **train})


# Two shared CPU cores: 60 steps of 8 x 512, then 20 of 2 x 2048 (4096 tokens per step both;
# 4x rather than 8x, what a CPU affords); 4 layers (global at 0, sliding 1-3), as the
# report's ablations at this size.
TINY = _scale(scales.TINY, seq=512, batch=8, steps=60, stage2_steps=20, stage2_batch=2,
              ratio=4, save_every=1000, **{"model.num_layers": 4})
# TPU: ~1.5B-total MoE (experiments/lib/scales.py); stage 1 at 32K, stage 2 at 256K with the
# same tokens per step and one sequence per device, the sequence split over `context` where
# one chip's HBM cannot hold a whole 256K row's activations (guessed meshes, plan-checked).
V5P_8 = _scale(scales.V5P_8, seq=32_768, batch=64, grad_accum=16, steps=10_000,
               stage2_steps=500, stage2_batch=8, stage2_accum=2)
V5E_16 = _scale(scales.V5E_16, seq=32_768, batch=64, grad_accum=4, steps=10_000,
                stage2_steps=500, stage2_batch=8, stage2_accum=2,
                stage2_mesh="data=1,fsdp=4,context=4")
V5P_128 = _scale(scales.V5P_128, seq=32_768, batch=128, grad_accum=2, steps=20_000,
                 stage2_steps=1_000, stage2_batch=16, stage2_mesh="data=1,fsdp=16,context=4")
SCALES = (TINY, V5P_8, V5E_16, V5P_128)

# Pre-training's single MTP head (report §2.3.2); the release's per-type bases.
MODEL = {"model.num_mtp_layers": 1, "mtp_lambda": 0.3,
         "model.sliding_attention": {"window": Scaled("window"), "rope_theta": BASE_SWA},
         "model.full_attention": {"rope_theta": BASE_32K}}
# Retrieval (teacher-forced probe, experiments/lib/passkey.py) at 4x, 16x, 32x and 128x the
# window: 64, 256, 512 (the stage-1 length) and 2048 (the stage-2 length) tokens on the CPU;
# 512 to 16K on TPU.
EVALS = (
    EvalSpec("perplexity"),
    EvalSpec("passkey", {"contexts": (Scaled("window", 4), Scaled("window", 16),
                                      Scaled("window", 32), Scaled("window", 128)),
                         "samples": 32}),
)


def _experiment(key: str, description: str, stage2_base: float) -> Experiment:
    scales_ = tuple(
        s.with_(train={"stages": [{**s.train["stages"][0],
                                   "model.full_attention": {"rope_theta": stage2_base}}]})
        for s in SCALES)
    return Experiment(name=f"long_context/{key}", description=description, scales=scales_,
                      train=MODEL, evals=EVALS, labels={"variant": description})


SWEEP = Sweep(
    name="long_context",
    description="32K -> 256K extension (8x) with and without raising the global RoPE base",
    experiments=(
        _experiment("extend-base5m", "extension, global base 640K -> 5M (report)", BASE_256K),
        _experiment("extend-base640k", "extension, global base kept at 640K", BASE_32K),
    ),
    claim=("Report §3.2: raising the global layers' RoPE base 640K -> 5M for the 256K stage "
           "(no YaRN) gives NIAH-Multi 96.7 at 256K."),
    metrics=("val_loss", "bits_per_byte", "passkey@4W", "passkey@16W", "passkey@32W",
             "passkey@128W", "passkey_gain@128W"),
)
