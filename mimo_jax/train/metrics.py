"""Training metrics: FLOPs per token and an MFU estimate, JSONL + TensorBoard + console output.

`WORKDIR/metrics.jsonl` gets one JSON object per logged step (at least `step` and `loss`);
validation records carry `"split": "val"`. TensorBoard event files (tensorboardX) go to
`WORKDIR/tensorboard`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.core import logs
from mimo_jax.model.config import AttentionSpec, ModelConfig


def _attn_matmul_params(spec: AttentionSpec, d: int) -> int:
    h, kv = spec.num_heads, spec.num_kv_heads
    return (
        d * h * spec.head_dim + d * kv * (spec.head_dim + spec.v_head_dim) + h * spec.v_head_dim * d
    )


def _mean_context(spec: AttentionSpec, seq_len: int) -> float:
    """Keys per query averaged over a causal row: (T+1)/2 for full, ~window for sliding."""
    t = np.arange(1, seq_len + 1)
    keys = t if spec.window is None else np.minimum(t, spec.window)
    return float(keys.mean())


def _attn_score_flops(spec: AttentionSpec, seq_len: int) -> float:
    """QK^T and PV multiply-adds per token (x2 for FLOPs)."""
    return 2.0 * spec.num_heads * (spec.head_dim + spec.v_head_dim) * _mean_context(spec, seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, num_mtp: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), active parameters only.

    Sliding-window attention counts as linear in its window, full attention as (T+1)/2 keys.
    The embedding lookup is free; every LM-head application (main and each MTP head) counts.
    """
    d = cfg.hidden_size
    n_mtp = cfg.num_mtp_layers if num_mtp is None else num_mtp
    fwd = 0.0
    for attn_type, mlp_type in cfg.layer_kinds:
        spec = cfg.attention_spec(attn_type)
        fwd += 2 * _attn_matmul_params(spec, d) + _attn_score_flops(spec, seq_len)
        if mlp_type == "moe":
            fwd += 2 * (
                d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
            )
        else:
            fwd += 2 * 3 * d * cfg.intermediate_size
    lm_head = 2 * d * cfg.vocab_size
    swa = cfg.sliding_attention
    mtp = (
        2 * 2 * d * d
        + 2 * _attn_matmul_params(swa, d)
        + _attn_score_flops(swa, seq_len)
        + 2 * 3 * d * cfg.intermediate_size
        + lm_head
    )
    fwd += lm_head + n_mtp * mtp
    return 3.0 * fwd


# Dense bf16 peak FLOP/s per chip by device_kind prefix (public spec sheets).
_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}
_cpu_peak: float | None = None


def peak_flops_per_device() -> tuple[float, str]:
    """(FLOP/s, how it was obtained): a spec-sheet number, or for CPUs a measured f32 matmul."""
    global _cpu_peak
    dev = jax.devices()[0]
    for prefix, peak in _PEAKS.items():
        if dev.device_kind.startswith(prefix):
            return peak, f"spec sheet ({dev.device_kind})"
    if _cpu_peak is None:
        # The best of 10 rounds: single rounds sometimes run at half speed (one core busy, or
        # the thread pool not yet spread out), and a low peak would inflate every MFU.
        n, reps = 1024, 3
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            for _ in range(reps):
                f(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _cpu_peak = reps * 2 * n**3 / best
    return _cpu_peak, "measured 1024^2 f32 matmul on this CPU, best of 10 rounds"


class MetricsLogger:
    """Writes metrics to JSONL, TensorBoard (tensorboardX) and the console.

    Console: a tqdm bar when stderr is a terminal, a summary line every `console_every`
    steps, and where no bar shows (a log file) also one every `every_s` seconds in between.
    TensorBoard: scalars under `train/` and `val/`, and at the start the run's config as
    hparams and as text; a resumed run hides the events a killed run logged after its
    checkpoint (`purge_step`).
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int | None,
        start_step: int,
        tensorboard: bool,
        progress_bar: bool,
        console_every: int,
        config: dict[str, Any] | None = None,
        every_s: float = logs.PLAIN_EVERY_S,
    ):
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = None
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"), start_step,
                                           config)
        self._progress = logs.Progress(total_steps, initial=start_step, desc="train",
                                       unit="step", enabled=progress_bar, plain=False)
        self._ticker = logs.Ticker(every_s)
        self.console_every = console_every

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        step = int(clean["step"])
        prefix = "val/" if clean.get("split") == "val" else "train/"
        if self._tb is not None:
            for tag, value in _scalars(clean, prefix).items():
                self._tb.add_scalar(tag, value, step)
        if clean.get("split") == "val":
            self.write(
                f"step {step}: val loss {clean['loss']:.4f}, perplexity {clean['perplexity']:.2f}"
            )
        elif step % self.console_every == 0 or (not self._progress.live and self._ticker.due()):
            mtp = ", ".join(f"{x:.3f}" for x in clean.get("mtp_ce", []))
            self.write(
                f"step {step}: loss {clean['loss']:.4f} ce {clean['ce']:.4f} mtp [{mtp}] "
                f"gnorm {clean['grad_norm']:.3f} lr {clean['lr']:.2e} "
                f"{clean.get('tokens_per_s', 0):.0f} tok/s mfu {100 * clean.get('mfu', 0):.1f}%"
            )
            self._ticker.reset()

    def advance(self, step: int, loss: float | None = None) -> None:
        self._progress.set(step, None if loss is None else f"loss={loss:.4f}")

    def write(self, line: str) -> None:
        """A console line (through the `mimo_jax` logger: above the bar, silent when quiet)."""
        logs.info(line)

    def close(self) -> None:
        self._progress.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


def _scalars(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """TensorBoard scalars of a record: numbers, and numeric lists as `name/i`."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
            out[prefix + k] = v
        elif isinstance(v, list) and v and all(isinstance(x, int | float) for x in v):
            out.update({f"{prefix}{k}/{i}": x for i, x in enumerate(v)})
    return out


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> {"a.b": value} with the scalar types TensorBoard's hparams accept."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:  # None, lists, tuples
            out[key] = json.dumps(v)
    return out


def _tensorboard_writer(logdir: str, start_step: int, config: dict[str, Any] | None):
    # Imported here: tensorboardX is needed only by runs that write TensorBoard files.
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    # File names carry only the second and host; the suffix keeps two writers of one second
    # (a quick restart) apart and in order.
    suffix = f".{time.time_ns() % 1_000_000_000:09d}.{os.getpid()}"
    writer = SummaryWriter(logdir, purge_step=start_step + 1 if start_step else None,
                           flush_secs=10, filename_suffix=suffix)
    if config is not None:
        # In the run's own directory (SummaryWriter.add_hparams would open a sub-run), so the
        # hparams dashboard links this config to this run's train/val loss curves.
        for summary in hparams(flat_hparams(config), {"train/loss": None, "val/loss": None}):
            writer.file_writer.add_summary(summary, start_step)
        text = json.dumps(config, indent=2, default=str)
        writer.add_text("config", "\n".join("    " + line for line in text.splitlines()),
                        start_step)
    return writer


def _jsonable(v: Any) -> Any:
    if isinstance(v, jax.Array | np.ndarray | np.generic):
        v = np.asarray(v)
        v = v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
