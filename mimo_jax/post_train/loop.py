"""The MOPD loop: rollout -> teacher prefill -> reward -> update, resumable.

Every step: `prompts_per_step` prompts (domains in turn, drawn from each task's train split
with a generator seeded by (seed, step)), `samples_per_prompt` rollouts each from the current
student (key folded from (seed, step)), each rollout scored by its domain's teacher in one
jitted forward (rows padded to a power of two, so a handful of shapes compile), rewards from
the task's checker, then one optimiser step on Eq. 7/9 with IcePop and routing replay. Since
every random draw is a function of (seed, step), a resumed run repeats an uninterrupted one
exactly. Checkpoints (`WORKDIR/checkpoints`) hold the student's variables, the optimiser
state and the run's key; `WORKDIR/metrics.jsonl` and TensorBoard files get per-step metrics
(per-domain reward and reverse KL to the teacher, IcePop drop rate, routing-replay mismatch
rate) and periodic held-out scores (`"split": "eval"`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.core import logs
from mimo_jax.core.errors import CheckpointError
from mimo_jax.data.tokenizer import load_tokenizer
from mimo_jax.model.mimo import MiMo
from mimo_jax.post_train.checkpoint import RunCheckpointer, model_meta
from mimo_jax.post_train.config import MOPDConfig
from mimo_jax.post_train.evaluate import score
from mimo_jax.post_train.logprobs import sequence_logprobs
from mimo_jax.post_train.loss import group_advantages
from mimo_jax.post_train.rollout import rollout
from mimo_jax.post_train.steps import make_mopd_step, split_trainable
from mimo_jax.post_train.tasks import Task, decode_response, encode_prompt, make_task
from mimo_jax.train.optimizer import make_optimizer


@dataclasses.dataclass
class MOPDResult:
    step: int
    start_step: int
    history: list[dict[str, Any]]  # this invocation's step records
    evals: list[dict[str, Any]]  # this invocation's held-out scores
    model: MiMo
    response_tokens: int  # sampled tokens trained on, over the whole run


def load_model(path: str) -> tuple[MiMo, dict[str, Any]]:
    """A training or post-training work directory (its latest checkpoint) and its meta."""
    from mimo_jax.train.loop import load_checkpoint

    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory at {path}")
    return load_checkpoint(path)


class TeacherSet:
    """Frozen teachers, one per domain: `logprobs(domains_b, tokens, lengths)` scores each
    row with its domain's teacher (teachers route their own experts; nothing is replayed)."""

    def __init__(self, teachers: dict[str, MiMo]):
        self.models = teachers
        self._fns: dict[str, tuple[Callable, Any]] = {}
        for d, m in teachers.items():
            graphdef, state = nnx.split(m)
            self._fns[d] = (_prefill_fn(graphdef), state)

    def logprobs(self, domains: list[str], tokens: np.ndarray, lengths: np.ndarray,
                 temperature: float = 1.0) -> np.ndarray:
        out = np.zeros(tokens.shape, np.float32)
        for d in sorted(set(domains)):
            rows = np.asarray([i for i, x in enumerate(domains) if x == d])
            bucket = 1 << (len(rows) - 1).bit_length()
            padded = np.concatenate([rows, np.full(bucket - len(rows), rows[0])])
            fn, state = self._fns[d]
            lp = fn(state, jnp.asarray(tokens[padded]), jnp.asarray(lengths[padded]),
                    jnp.float32(temperature))
            out[rows] = np.asarray(lp)[: len(rows)]
        return out


_JITTED: dict[Any, Any] = {}  # one compiled function per model structure and setting


def _prefill_fn(graphdef: nnx.GraphDef) -> Callable:
    key = ("prefill", graphdef)
    if key not in _JITTED:
        def fn(state, tokens, lengths, temperature):
            return sequence_logprobs(nnx.merge(graphdef, state), tokens, lengths,
                                     temperature=temperature)[0]

        _JITTED[key] = jax.jit(fn)
    return _JITTED[key]


def _mopd_step(graphdef: nnx.GraphDef, model_cfg, cfg: MOPDConfig):
    """(optimizer, jitted step) for this structure and these settings, built once."""
    settings = dict(alpha=cfg.alpha, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    temperature=cfg.temperature, bias_gamma=cfg.bias_gamma,
                    routing_replay=cfg.routing_replay, measure_mismatch=cfg.measure_mismatch)
    opt = (cfg.lr, cfg.end_lr, cfg.warmup_steps, cfg.weight_decay, cfg.clip_norm, cfg.b1, cfg.b2,
           cfg.steps)
    key = ("mopd", graphdef, model_cfg, opt, tuple(sorted(settings.items())))
    if key not in _JITTED:
        tx = make_optimizer(cfg.optimizer_config())
        _JITTED[key] = (tx, make_mopd_step(graphdef, model_cfg, tx, **settings))
    return _JITTED[key]


def draw_prompts(cfg: MOPDConfig, tasks: dict[str, Task], step: int):
    """(domain, prompt text) per prompt of this step: domains in turn, train split."""
    rng = np.random.default_rng([cfg.seed, step])
    domains = sorted(tasks)
    out = []
    for i in range(cfg.prompts_per_step):
        d = domains[i % len(domains)]
        out.append((d, tasks[d].sample(rng, "train")[0]))
    return out


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _truncate_jsonl(path: str, upto: int) -> None:
    """Drop what a killed run logged after its last checkpoint (the resumed run redoes it)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= upto]
    with open(path, "w") as f:
        f.writelines(keep)


def mopd(cfg: MOPDConfig, workdir: str, *, log: Callable[[str], None] | None = None,
         on_step: Callable[[int, dict], None] | None = None) -> MOPDResult:
    """Run (or resume) MOPD into `workdir` until `cfg.steps`."""
    cfg.validate()
    say = log or logs.info
    student, meta = load_model(cfg.student)
    tok_spec = meta.get("tokenizer") or {"kind": "byte"}
    tok = load_tokenizer(tok_spec)
    teachers = {}
    for d, path in sorted(cfg.teachers.items()):
        t, tmeta = load_model(path)
        if (tmeta.get("tokenizer") or {"kind": "byte"}) != tok_spec:
            raise ValueError(f"teacher {d!r} ({path}) uses tokenizer {tmeta.get('tokenizer')}, "
                             f"the student {tok_spec}: MOPD needs one vocabulary")
        if t.cfg.vocab_size != student.cfg.vocab_size:
            raise ValueError(f"teacher {d!r} has vocab_size {t.cfg.vocab_size}, the student "
                             f"{student.cfg.vocab_size}")
        teachers[d] = t
    tasks = {d: make_task(spec) for d, spec in cfg.tasks.items()}
    teacher_set = TeacherSet(teachers)

    graphdef, params, rest = split_trainable(student)
    tx, train_step = _mopd_step(graphdef, student.cfg, cfg)
    opt_state = jax.jit(tx.init)(params)
    rng = jax.random.key_data(jax.random.key(cfg.seed))
    os.makedirs(workdir, exist_ok=True)
    ckpt = RunCheckpointer(workdir, keep=cfg.keep_checkpoints)
    step, response_tokens = 0, 0
    latest = ckpt.latest_step()
    if latest is not None:
        student, opt_state, rng, saved = ckpt.restore(latest, student, opt_state, rng)
        graphdef, params, rest = split_trainable(student)
        step, response_tokens = latest, int(saved.get("response_tokens", 0))
        say(f"resuming MOPD from step {step}")
    start_step = step
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _truncate_jsonl(metrics_path, step)
    with open(os.path.join(workdir, "mopd_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    tb = None
    if cfg.tensorboard:
        from mimo_jax.train.metrics import _tensorboard_writer

        tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"), step,
                                 {"mopd": cfg.to_dict()})

    stops = [] if tok.eos_id is None else [int(tok.eos_id)]
    base_key = jax.random.wrap_key_data(rng)
    domains = sorted(tasks)

    def save(at: int) -> None:
        model = nnx.merge(graphdef, params, rest)
        ckpt.save(at, model, opt_state, rng,
                  model_meta(model, tok_spec, at, mopd_config=cfg.to_dict(),
                             response_tokens=response_tokens))

    def run_eval(at: int) -> dict[str, Any]:
        model = nnx.merge(graphdef, params, rest)
        rec = {"step": at, "split": "eval"}
        for d in domains:
            rec[f"score_{d}"] = score(model, tasks[d], tok, num_prompts=cfg.eval_prompts,
                                      max_new_tokens=cfg.max_new_tokens)
        return rec

    history, evals = [], []
    try:
        if cfg.eval_every and step == 0:
            rec = run_eval(0)
            evals.append(rec)
            _write_jsonl(metrics_path, [rec])
        while step < cfg.steps:
            t0 = time.perf_counter()
            drawn = draw_prompts(cfg, tasks, step)
            row_domain, row_prompt, row_group = [], [], []
            for g, (d, p) in enumerate(drawn):
                for _ in range(cfg.samples_per_prompt):
                    row_domain.append(d)
                    row_prompt.append(p)
                    row_group.append(g)
            model = nnx.merge(graphdef, params, rest)
            ro = rollout(model, [encode_prompt(tok, p) for p in row_prompt],
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         key=jax.random.fold_in(base_key, step), stop_tokens=stops)
            teacher_logp = teacher_set.logprobs(row_domain, ro.tokens, ro.lengths,
                                                cfg.temperature)
            rewards = np.asarray([
                tasks[d].reward(p, decode_response(tok, ro.tokens[i, ro.prompt_lengths[i]:
                                                                  ro.lengths[i]].tolist()))
                for i, (d, p) in enumerate(zip(row_domain, row_prompt, strict=True))
            ], np.float32)
            adv = group_advantages(jnp.asarray(rewards), jnp.asarray(row_group),
                                   len(drawn))
            batch = {
                "tokens": jnp.asarray(ro.tokens), "lengths": jnp.asarray(ro.lengths),
                "mask": jnp.asarray(ro.response_mask), "rollout_logp": jnp.asarray(ro.logp),
                "teacher_logp": jnp.asarray(teacher_logp), "orm_adv": adv,
                "expert_ids": jnp.asarray(ro.expert_ids),
            }
            # Minibatches in turn: after the first, the weights have moved away from the
            # sampler's (off-policy by one or more updates), which IcePop accounts for.
            k = cfg.minibatches
            parts = []
            for j in range(k):
                mb = {n: (v[:, j::k] if n == "expert_ids" else v[j::k]) for n, v in batch.items()}
                params, rest, opt_state, mj = train_step(params, rest, opt_state, mb)
                parts.append(jax.device_get(mj))
            rkl = np.zeros(len(row_domain), np.float32)
            for j, mj in enumerate(parts):
                rkl[j::k] = np.asarray(mj.pop("reverse_kl_b"))
            m = {n: float(np.mean([mj[n] for mj in parts])) for n in parts[0]}
            step += 1
            n_resp = int(ro.response_mask.sum())
            response_tokens += n_resp
            rec: dict[str, Any] = {"step": step}
            rec.update({k: float(v) for k, v in m.items()})
            for d in domains:
                sel = np.asarray([x == d for x in row_domain])
                rec[f"reward_{d}"] = float(rewards[sel].mean())
                rec[f"reverse_kl_{d}"] = float(rkl[sel].mean())
            rec["reward"] = float(rewards.mean())
            rec["response_tokens"] = n_resp
            rec["response_tokens_total"] = response_tokens
            rec["step_time_s"] = time.perf_counter() - t0
            history.append(rec)
            if step % cfg.log_every == 0 or step == cfg.steps:
                _write_jsonl(metrics_path, [rec])
                if tb is not None:
                    for k, v in rec.items():
                        if k != "step":
                            tb.add_scalar(f"mopd/{k}", v, step)
            if step % 10 == 0 or step == cfg.steps:
                say(f"step {step}: loss {rec['loss']:.4f} reward "
                    + " ".join(f"{d}={rec[f'reward_{d}']:.2f}" for d in domains)
                    + " revKL " + " ".join(f"{d}={rec[f'reverse_kl_{d}']:.3f}" for d in domains)
                    + f" drop {rec['icepop_drop_rate']:.3f}")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                ev = run_eval(step)
                evals.append(ev)
                _write_jsonl(metrics_path, [ev])
                if tb is not None:
                    for d in domains:
                        tb.add_scalar(f"eval/score_{d}", ev[f"score_{d}"], step)
                say(f"step {step}: held-out " + " ".join(
                    f"{d}={ev[f'score_{d}']:.3f}" for d in domains))
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
            if on_step is not None:
                on_step(step, rec)
    finally:
        ckpt.close()
        if tb is not None:
            tb.close()
    return MOPDResult(step, start_step, history, evals, nnx.merge(graphdef, params, rest),
                      response_tokens)
