"""The MOPD demonstration on CPU: two synthetic domains with verifiable rewards.

1. a base model (the student's start) gets a short supervised pass over both domains: it
   knows the answer format of each and the answers of neither well;
2. one teacher per domain: the base model fine-tuned (answers only) on its domain;
3. MOPD of the base model against both teachers (`mopd`);
4. the baseline: the base model fine-tuned on as many answer tokens as MOPD trained on,
   sampled from one teacher on its own domain's prompts;
5. greedy exact-match scores on held-out prompts of each domain for all of them.

Everything lands in WORKDIR (checkpoints, metrics.jsonl, demo.json); rerunning reuses the
finished stages and resumes MOPD.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from mimo_jax.core import logs
from mimo_jax.data.tokenizer import load_tokenizer
from mimo_jax.model.config import AttentionSpec, ModelConfig
from mimo_jax.model.mimo import MiMo
from mimo_jax.post_train.checkpoint import save_model
from mimo_jax.post_train.config import MOPDConfig
from mimo_jax.post_train.evaluate import score
from mimo_jax.post_train.loop import load_model, mopd
from mimo_jax.post_train.rollout import rollout
from mimo_jax.post_train.sft import sft
from mimo_jax.post_train.tasks import encode_prompt, make_task

TOKENIZER = {"kind": "byte"}
# Easy enough for a 0.5M-parameter model to learn in a few hundred SFT steps on CPU, with
# held-out prompts that are new: `add` asks for the sum of three digits ("3+1+4=" -> "8";
# 1,000 prompts, about 200 held out), `reverse` for 2-4 letters out of 6 reversed ("r:abc="
# -> "cba"; 1,548 prompts). (a + b) mod 10 of two-digit numbers looks easier but is not: no
# single digit says anything about the answer, and the model did not learn it in 500 steps.
TASKS = {"add": {"kind": "mod_add", "modulus": 100, "max_operand": 10, "terms": 3},
         "reverse": {"kind": "reverse", "alphabet": "abcdef", "min_len": 2, "max_len": 4}}


def demo_model_config() -> ModelConfig:
    """A ~0.5M-parameter MiMo with the release's structure (hybrid sliding/global attention
    with sinks, a dense first layer, sigmoid top-2 MoE with a correction bias, scanned
    blocks) over the byte vocabulary; no MTP heads (MOPD does not use them)."""
    return ModelConfig.tiny(
        vocab_size=260, hidden_size=64, num_layers=5,
        layer_types=("sliding", "sliding", "full", "sliding", "full"),
        full_attention=AttentionSpec(4, 1, 16, 16, 10_000.0, 0.5, False, None),
        sliding_attention=AttentionSpec(4, 2, 16, 16, 10_000.0, 0.5, True, 16),
        intermediate_size=192, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128, num_mtp_layers=0)


DEFAULTS: dict[str, Any] = {
    "tasks": TASKS, "seq_len": 16, "batch_size": 64, "base_steps": 100, "teacher_steps": 400,
    "sft_lr": 3e-3, "mopd_steps": 500, "eval_prompts": 256, "baseline_domain": "add",
    # MOPD: 64 prompts x 8 samples at lr 1e-3. Smaller batches (16 x 4) or a higher lr (2e-3)
    # sharpened the student onto wrong answers before it learned the right ones (reverse KL
    # is mode-seeking, and a collapsed token's gradient vanishes): experiments/results/
    # mopd_notes.md has the runs.
    "mopd": {"prompts_per_step": 64, "samples_per_prompt": 8, "max_new_tokens": 6,
             "temperature": 1.0, "lr": 1e-3, "end_lr": 1e-4, "warmup_steps": 10, "alpha": 0.5,
             "eval_every": 50, "eval_prompts": 128, "save_every": 50},
}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_demo(workdir: str, overrides: dict[str, Any] | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or logs.info
    opts = json.loads(json.dumps(DEFAULTS))
    for k, v in (overrides or {}).items():
        if k == "mopd":
            opts["mopd"].update(v)
        elif k not in opts:
            raise ValueError(f"unknown demo option {k!r}; known: {sorted(opts)}")
        else:
            opts[k] = v
    os.makedirs(workdir, exist_ok=True)
    tok = load_tokenizer(TOKENIZER)
    tasks = {d: make_task(s) for d, s in opts["tasks"].items()}
    domains = sorted(tasks)
    cfg = demo_model_config()
    t_wall, t_cpu = time.perf_counter(), _cpu_seconds()
    timings: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    answer_tokens: dict[str, int] = {}

    def draw_from(ds: list[str]):
        def draw(rng: np.random.Generator, n: int):
            return [tasks[ds[i % len(ds)]].sample(rng, "train") for i in range(n)]
        return draw

    # The supervised stages are reused on a rerun only if they were built with these options.
    sft_opts = {k: opts[k] for k in ("tasks", "seq_len", "batch_size", "base_steps",
                                     "teacher_steps", "sft_lr")}

    def stage(name: str, build: Callable[[], MiMo], key: dict[str, Any],
              rebuild_on_change: bool = False) -> str:
        path = os.path.join(workdir, name)
        record = os.path.join(path, "stage.json")
        if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(record):
            with open(record) as f:
                rec = json.load(f)
            if rec.pop("stage_key", None) == json.loads(json.dumps(key)):
                say(f"{name}: reusing {path}")
                timings.update(rec)
                return path
            if not rebuild_on_change:
                raise ValueError(f"{path} was built with other options than {key}: use a "
                                 "fresh --workdir (or delete that stage)")
            say(f"{name}: options changed, rebuilding {path}")
        if os.path.isdir(path):  # a stage that changed, or one stopped before its record
            shutil.rmtree(path)
        c0, w0 = _cpu_seconds(), time.perf_counter()
        model = build()
        save_model(path, model, TOKENIZER)
        spent: dict[str, Any] = {f"{name}_cpu_s": _cpu_seconds() - c0,
                                 f"{name}_wall_s": time.perf_counter() - w0}
        if name in answer_tokens:
            spent[f"{name}_answer_tokens"] = answer_tokens[name]
        timings.update(spent)
        with open(record, "w") as f:
            json.dump({**spent, "stage_key": key}, f)
        return path

    def sft_from(start: MiMo, draw, steps: int, seed: int, name: str) -> MiMo:
        model, losses, n_tok = sft(start, draw, tok, steps=steps,
                                   batch_size=opts["batch_size"], seq_len=opts["seq_len"],
                                   lr=opts["sft_lr"], seed=seed,
                                   log=lambda s: say(f"{name}: {s}"), log_every=250)
        curves[f"{name}_loss"] = losses
        answer_tokens[name] = n_tok
        return model

    base_path = stage("base", lambda: sft_from(MiMo(cfg, rngs=nnx.Rngs(0)), draw_from(domains),
                                               opts["base_steps"], 1, "base"), sft_opts)
    teacher_paths = {}
    for i, d in enumerate(domains):
        teacher_paths[d] = stage(
            f"teacher_{d}",
            lambda d=d, i=i: sft_from(load_model(base_path)[0], draw_from([d]),
                                      opts["teacher_steps"], 10 + i, f"teacher_{d}"), sft_opts)

    mcfg = MOPDConfig(student=base_path, teachers=teacher_paths, tasks=dict(opts["tasks"]),
                      steps=opts["mopd_steps"], **opts["mopd"])
    mopd_dir = os.path.join(workdir, "mopd")
    saved_cfg = os.path.join(mopd_dir, "mopd_config.json")
    if os.path.exists(saved_cfg):  # resume only the same run (`steps` may grow; note that
        # with `end_lr` the lr schedule stretches with it)
        with open(saved_cfg) as f:
            old = {k: v for k, v in json.load(f).items() if k != "steps"}
        new = {k: v for k, v in json.loads(json.dumps(mcfg.to_dict())).items() if k != "steps"}
        if old != new:
            raise ValueError(f"{mopd_dir} holds a MOPD run with other options: delete it (the "
                             "supervised stages are reused) or use a fresh --workdir")
    c0, w0 = _cpu_seconds(), time.perf_counter()
    result = mopd(mcfg, mopd_dir, log=say)
    timings["mopd_cpu_s_this_invocation"] = _cpu_seconds() - c0
    timings["mopd_wall_s_this_invocation"] = time.perf_counter() - w0
    mopd_tokens = result.response_tokens

    # The baseline: SFT on the same number of answer tokens, sampled from one teacher.
    bd = opts["baseline_domain"]
    teacher_b = load_model(teacher_paths[bd])[0]
    stops = [int(tok.eos_id)]

    def teacher_draw(rng: np.random.Generator, n: int):
        prompts = [tasks[bd].sample(rng, "train")[0] for _ in range(n)]
        ro = rollout(teacher_b, [encode_prompt(tok, p) for p in prompts],
                     max_new_tokens=mcfg.max_new_tokens, temperature=mcfg.temperature,
                     key=jax.random.key(int(rng.integers(1 << 31))), stop_tokens=stops)
        return [(p, ro.tokens[i, ro.prompt_lengths[i]:ro.lengths[i]].tolist())
                for i, p in enumerate(prompts)]

    per_row = float(np.mean([len(tok.encode(tasks[bd].sample(np.random.default_rng(i),
                                                                  "train")[1])) + 1
                             for i in range(200)]))
    base_steps = max(1, round(mopd_tokens / (per_row * opts["batch_size"])))

    def baseline_build() -> MiMo:
        return sft_from(load_model(base_path)[0], teacher_draw, base_steps, 99,
                        f"baseline_sft_{bd}")

    baseline_path = stage(f"baseline_sft_{bd}", baseline_build,
                          {**sft_opts, "baseline_domain": bd, "baseline_steps": base_steps},
                          rebuild_on_change=True)

    say("scoring on held-out prompts")
    c0, w0 = _cpu_seconds(), time.perf_counter()
    models = {"base (student before MOPD)": base_path, "student after MOPD": None,
              f"SFT baseline (teacher {bd} only)": baseline_path}
    models.update({f"teacher {d}": p for d, p in teacher_paths.items()})
    scores: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        model = result.model if path is None else load_model(path)[0]
        scores[name] = {d: score(model, tasks[d], tok, num_prompts=opts["eval_prompts"],
                                 max_new_tokens=mcfg.max_new_tokens) for d in domains}
        say(f"{name}: " + ", ".join(f"{d} {v:.3f}" for d, v in scores[name].items()))
    timings["scoring_cpu_s"] = _cpu_seconds() - c0
    timings["scoring_wall_s"] = time.perf_counter() - w0
    ratio = {d: scores["student after MOPD"][d] / max(scores[f"teacher {d}"][d], 1e-9)
             for d in domains}
    out = {
        "options": opts, "model_config_params": _param_count(cfg), "scores": scores,
        "mopd_over_teacher": ratio, "mopd_response_tokens": mopd_tokens,
        "baseline_steps": base_steps, "baseline_domain": bd, "curves": curves,
        "timings": {**timings, "wall_s_this_invocation": time.perf_counter() - t_wall,
                    "cpu_s_this_invocation": _cpu_seconds() - t_cpu},
        "load_average": os.getloadavg(),
    }
    prev = os.path.join(workdir, "demo.json")
    if os.path.exists(prev):  # keep the stage timings of earlier invocations
        with open(prev) as f:
            old = json.load(f).get("timings", {})
        out["timings"] = {**{k: v for k, v in old.items() if k not in out["timings"]},
                          **out["timings"]}
    with open(prev, "w") as f:
        json.dump(out, f, indent=2)
    return out


def _param_count(cfg: ModelConfig) -> int:
    model = nnx.eval_shape(lambda: MiMo(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
