"""What the notebooks in this folder share: the tiny checkpoint they make when none is given,
the persistent compilation cache, figure and result display.

This folder is not a package (no `__init__.py`): the notebooks are not modules of
`experiments`, and pytest never imports them. A notebook imports this file from its own
folder (Jupyter starts the kernel there; `notebook_dir()` finds it otherwise).

The tiny checkpoint (`tiny_checkpoint()`): a byte-level BPE tokenizer and a tiny MiMo (the
release's structure: hybrid sliding/global attention with sinks, sigmoid MoE, 3 MTP heads)
trained for a few dozen steps on the Python standard library's sources, exported in the
released layout with FP8 weights (`orbax_to_hf(..., fp8_out=True)`), with `tokenizer.json`
beside it. It is built once per recipe under `$MIMO_JAX_NOTEBOOK_CACHE` (default: a folder in
the system's temp dir), behind a file lock, and reused by every notebook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

CACHE_ENV = "MIMO_JAX_NOTEBOOK_CACHE"
FIGURES_ENV = "MIMO_JAX_NOTEBOOK_FIGURES"
RECIPE_VERSION = 1  # bump when the recipe below changes what a cached checkpoint holds

# The tiny checkpoint: ~1 min of CPU time to train, enough for the MTP heads to agree with the
# main model on predictable code tokens (indentation, keywords) and not elsewhere.
TINY_RECIPE: dict[str, Any] = {
    "vocab_size": 512,  # BPE ids = model vocabulary (ModelConfig.tiny's)
    # Attention shaped like the release's for FP8: on global layers 2 KV heads whose fused
    # [K_h; V_h] (64 + 80 rows) straddles a 128-row scale block, as 192 + 128 do in the
    # release, with a per-head scale grid that has more rows than the uniform one (which is
    # how loaders recognise it). ModelConfig.tiny's 1 x (32 + 24) fails both: its V scale
    # would have no rows, which the converters cannot store or read back. Sliding layers get
    # the same head dims and twice the KV heads (transformers 5.23 derives both that way).
    "full_attention": {"num_kv_heads": 2, "head_dim": 64, "v_head_dim": 80},
    "sliding_attention": {"num_kv_heads": 4, "head_dim": 64, "v_head_dim": 80},
    "tokenizer_bytes": 1_500_000,  # training text the tokenizer learns from
    "steps": 80,
    "batch_size": 8,
    "seq_len": 128,
    "lr": 3e-3,
    "warmup_steps": 5,
}


def notebook_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def cache_dir() -> str:
    path = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "mimo-jax-notebooks")
    os.makedirs(path, exist_ok=True)
    return path


def enable_compilation_cache(path: str | None = None) -> str:
    """Keep compiled XLA programs on disk (JAX's persistent cache), so a restarted kernel or
    another notebook with the same shapes does not compile again."""
    import jax

    path = path or os.path.join(cache_dir(), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def environment() -> dict[str, Any]:
    """Versions and devices, for the first output of a notebook."""
    from importlib.metadata import PackageNotFoundError, version

    import flax
    import jax

    try:
        ours = version("mimo-jax")
    except PackageNotFoundError:  # a source tree on PYTHONPATH
        ours = "source"
    devs = jax.devices()
    return {"jax": jax.__version__, "flax": flax.__version__, "mimo_jax": ours,
            "backend": jax.default_backend(), "devices": len(devs),
            "device_kind": devs[0].device_kind, "processes": jax.process_count()}


def cpu_seconds() -> float:
    """CPU time of this process so far (all threads), user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------- the tiny checkpoint
@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    root: str
    release: str  # released layout: config.json, FP8 safetensors (+ scales), MTP, tokenizer
    workdir: str  # the training work directory (Orbax checkpoints, metrics.jsonl)
    tokenizer: str  # tokenizer.json (also copied into `release`)
    data: dict[str, Any]  # the training run's DataConfig (its held-out split is the eval corpus)
    seq_len: int
    info: dict[str, Any]  # recipe, timings, final losses

    def corpus(self, split: str = "val", **changes: Any):
        """The training run's documents (default: its held-out split) as an eval `Corpus`."""
        from mimo_jax.eval import Corpus

        return Corpus(source=self.data["source"], kind=self.data["kind"],
                      field=self.data["field"], split=split,
                      val_fraction=self.data["val_fraction"], seed=self.data["seed"], **changes)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _recipe_key(recipe: Mapping[str, Any]) -> str:
    blob = json.dumps({"recipe": dict(recipe), "version": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def tiny_checkpoint(recipe: Mapping[str, Any] | None = None, *, log=print) -> TinyCheckpoint:
    """The tiny trained checkpoint in the released layout (built on first use, then cached)."""
    recipe = {**TINY_RECIPE, **(recipe or {})}
    root = os.path.join(cache_dir(), f"tiny-{_recipe_key(recipe)}")
    with _locked(root + ".lock"):
        done = os.path.join(root, "done.json")
        if not os.path.isfile(done):
            shutil.rmtree(root, ignore_errors=True)  # a build that died half-way
            _build_tiny(root, recipe, log)
        with open(done) as f:
            info = json.load(f)
    return TinyCheckpoint(root=root, release=os.path.join(root, "release"),
                          workdir=os.path.join(root, "workdir"),
                          tokenizer=os.path.join(root, "release", "tokenizer.json"),
                          data=info["data"], seq_len=info["recipe"]["seq_len"], info=info)


def _stdlib_training_text(data, max_bytes: int) -> list[str]:
    """The first `max_bytes` of the training side of the corpus (never the held-out side)."""
    from mimo_jax.data import open_source, split_documents

    docs = open_source(data.source, data.kind, data.field)
    split = split_documents(len(docs), data.val_fraction, data.seed)
    texts, total = [], 0
    for i in split.train:
        texts.append(docs[i])
        total += len(texts[-1])
        if total >= max_bytes:
            break
    return texts


def _build_tiny(root: str, recipe: Mapping[str, Any], log) -> None:
    from mimo_jax.checkpoint import orbax_to_hf
    from mimo_jax.data.bpe import BOS, EOS, train_bpe_tokenizer
    from mimo_jax.train import TrainConfig, train

    t0, c0 = time.perf_counter(), cpu_seconds()
    base = TrainConfig.preset("tiny-cpu")
    log(f"building the tiny checkpoint in {root} (once; later runs reuse it)")
    os.makedirs(root)  # done.json, written last, marks it complete
    spec = train_bpe_tokenizer(_stdlib_training_text(base.data, recipe["tokenizer_bytes"]),
                               os.path.join(root, "tokenizer.json"),
                               vocab_size=recipe["vocab_size"])
    tc = base.override({
        "data.tokenizer": spec, "model.vocab_size": recipe["vocab_size"],
        "model.full_attention": dict(recipe["full_attention"]),
        "model.sliding_attention": dict(recipe["sliding_attention"]),
        "steps": recipe["steps"], "batch_size": recipe["batch_size"],
        "seq_len": recipe["seq_len"], "lr": recipe["lr"], "warmup_steps": recipe["warmup_steps"],
        "save_every": recipe["steps"], "val_every": recipe["steps"],
        "console_every": max(recipe["steps"] // 3, 1), "progress_bar": False,
        "tensorboard": False, "async_checkpointing": False,
    })
    result = train(tc, os.path.join(root, "workdir"), log=log)
    release = os.path.join(root, "release")
    orbax_to_hf(os.path.join(root, "workdir"), release, fp8_out=True, progress=False)
    shutil.copy(spec["path"], os.path.join(release, "tokenizer.json"))
    with open(os.path.join(release, "tokenizer_config.json"), "w") as f:
        # Training puts BOS before every document; so does evaluation (add_bos_token).
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
                   "eos_token": EOS, "add_bos_token": True}, f, indent=2)
    info = {"recipe": dict(recipe), "data": dataclasses.asdict(tc.data),
            "train_loss_first": result.losses[0] if result.losses else None,
            "train_loss_last": result.losses[-1] if result.losses else None,
            "val_loss": result.val_loss, "steps": result.step,
            "build_seconds": round(time.perf_counter() - t0, 1),
            "build_cpu_seconds": round(cpu_seconds() - c0, 1)}
    with open(os.path.join(root, "done.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(f"tiny checkpoint ready: {result.step} steps, loss {info['train_loss_first']:.2f} -> "
        f"{info['train_loss_last']:.2f}, {info['build_seconds']} s "
        f"({info['build_cpu_seconds']} s CPU)")


# ----------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Opened:
    model: Any  # mimo_jax.MiMo
    tokenizer: Any  # mimo_jax.eval.tokenizer.EvalTokenizer (lm-eval conventions)
    path: str
    tiny: TinyCheckpoint | None  # set when the notebook made the checkpoint itself
    mesh: Any  # jax.sharding.Mesh or None
    load_seconds: float

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        """The training-pipeline spec of the tokenizer (BOS/EOS as training used them)."""
        return self.tokenizer.spec

    def activate(self):
        """A block in which traced model code runs over the mesh (per-shard attention, expert
        parallelism); a no-op on one device. Trace (first call) jitted functions inside it."""
        if self.mesh is None:
            return contextlib.nullcontext()
        from mimo_jax.sharding import ShardingRules
        from mimo_jax.sharding.rules import activate

        return activate(self.mesh, ShardingRules.preset())


def open_checkpoint(checkpoint: str | None, *, tokenizer: str | None = None,
                    dtype: str | None = None, mesh: str = "", keep_fp8: bool = False,
                    log=print) -> Opened:
    """Load `checkpoint` (a release/HF dir, FP8 included; an Orbax dir; a training workdir),
    or make the tiny one when it is None, with its tokenizer.

    mesh: "" for one device, else a mesh spec ("fsdp=-1", "data=2,fsdp=4"): parameters are
    placed directly in their shards (with the preset sharding rules).
    keep_fp8: keep FP8 weights as E4M3 on device (half the memory of bfloat16)."""
    import mimo_jax
    from mimo_jax.eval.tokenizer import resolve_tokenizer
    from mimo_jax.sharding import make_mesh

    tiny = None
    if checkpoint is None:
        tiny = tiny_checkpoint(log=log)
        checkpoint = tiny.release
    checkpoint = os.path.abspath(os.path.expanduser(os.fspath(checkpoint)))
    mesh_obj = make_mesh(mesh) if mesh else None
    t0 = time.perf_counter()
    model = mimo_jax.load(checkpoint, dtype=dtype, mesh=mesh_obj, keep_fp8=keep_fp8)
    seconds = time.perf_counter() - t0
    tok = resolve_tokenizer(checkpoint, tokenizer)
    cfg = model.cfg
    log(f"loaded {checkpoint} in {seconds:.1f} s: {cfg.num_layers} layers "
        f"({cfg.layer_types.count('full')} global, {cfg.layer_types.count('sliding')} "
        f"sliding), {len(model.mtp)} MTP heads, {cfg.dtype}; tokenizer {tok.name} "
        f"({tok.vocab_size} ids)" + (f"; mesh {dict(mesh_obj.shape)}" if mesh_obj else ""))
    return Opened(model, tok, checkpoint, tiny, mesh_obj, seconds)


# ----------------------------------------------------------------------------- display
def show(fig, name: str | None = None) -> None:
    """Display a matplotlib Figure as a PNG output (any backend, headless too) and, when
    $MIMO_JAX_NOTEBOOK_FIGURES is set, save it there as NAME.png."""
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    folder = os.environ.get(FIGURES_ENV)
    if folder and name:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.png"), "wb") as f:
            f.write(buf.getvalue())
    display(Image(data=buf.getvalue(), format="png"))


def figure(*args: Any, **kwargs: Any):
    """A matplotlib Figure and axes without pyplot (no global figure state, no GUI)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", (7, 4)), layout="constrained")
    return fig, fig.subplots(*args, **kwargs)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int = 4) -> str:
    """Rows of dicts as a markdown table (floats to `digits` significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def show_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
               digits: int = 4) -> None:
    from IPython.display import Markdown, display

    display(Markdown(markdown_table(rows, columns, digits)))


def report(check: str, **values: Any) -> dict[str, Any]:
    """A notebook's headline numbers as one JSON output (`application/json`, what the tests
    read) with a readable text form."""
    from IPython.display import display

    payload = {"check": check, **{k: _jsonable(v) for k, v in values.items()}}
    text = "\n".join(f"{k}: {v}" for k, v in payload.items())
    display({"application/json": payload, "text/plain": text}, raw=True)
    return payload


def _jsonable(v: Any) -> Any:
    import numpy as np

    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and v != v:  # NaN: JSON has none
        return None
    return v
