"""MOPD run configuration. Every choice the report leaves open is a field here, with the
value we chose and why."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from mimo_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class MOPDConfig:
    student: str = ""  # checkpoint (workdir / Orbax dir) the student starts from
    teachers: dict = dataclasses.field(default_factory=dict)  # domain -> checkpoint
    tasks: dict = dataclasses.field(default_factory=dict)  # domain -> {"kind": ..., options}
    steps: int = 100
    # rollouts
    prompts_per_step: int = 16  # spread evenly over the domains (round robin)
    samples_per_prompt: int = 4  # the GRPO group of each prompt
    max_new_tokens: int = 16
    temperature: float = 1.0  # the sampling policy mu; the trainer scores pi at the same T
    # loss (Eq. 7-9); the report gives none of these values
    alpha: float = 0.5  # weight of the outcome advantage: the token advantage stays dominant
    eps_low: float = 0.5  # IcePop's own defaults (Zhao et al. 2025: [0.5, 5])
    eps_high: float = 5.0
    minibatches: int = 1  # optimiser steps per rollout batch (rows interleaved: every
    # minibatch gets samples of every prompt); > 1 makes later ones off-policy (IcePop's case)
    routing_replay: bool = True  # R3: score pi with the rollout's experts
    measure_mismatch: bool = True  # one extra forward per step without replay, for metrics
    bias_gamma: float = 0.0  # correction-bias update (replay pins routing; off by default)
    # optimiser (AdamW as in training, paper §4.2 SFT values where they apply)
    lr: float = 1e-5
    end_lr: float | None = None  # None: constant lr after warm-up; else cosine to it by `steps`
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    # bookkeeping
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 3
    eval_every: int = 25  # greedy exact-match score on held-out prompts per domain (0 = off)
    eval_prompts: int = 128
    log_every: int = 1
    tensorboard: bool = True

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid MOPD config: {msg}")

        if not self.student:
            fail("set `student` to a checkpoint")
        if not self.teachers:
            fail("give at least one teacher: teachers = {domain: checkpoint}")
        if set(self.teachers) != set(self.tasks):
            fail(f"teachers {sorted(self.teachers)} and tasks {sorted(self.tasks)} must name "
                 "the same domains")
        if self.temperature <= 0:
            fail("temperature must be > 0 (on-policy sampling)")
        if not 0 < self.eps_low <= 1 <= self.eps_high:
            fail(f"need 0 < eps_low <= 1 <= eps_high, got [{self.eps_low}, {self.eps_high}]")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1")
        if self.minibatches < 1 or (self.prompts_per_step * self.samples_per_prompt
                                    % self.minibatches):
            fail(f"minibatches ({self.minibatches}) must divide the rollout batch "
                 f"({self.prompts_per_step} x {self.samples_per_prompt} rows)")
        if self.prompts_per_step % len(self.teachers):
            fail(f"prompts_per_step ({self.prompts_per_step}) must divide evenly over "
                 f"{len(self.teachers)} domains")

    def optimizer_config(self) -> TrainConfig:
        decay = 0 if self.end_lr is None else max(self.steps - self.warmup_steps, 1)
        return TrainConfig(lr=self.lr, end_lr=self.lr if self.end_lr is None else self.end_lr,
                           warmup_steps=self.warmup_steps, decay_steps=decay, steps=self.steps,
                           weight_decay=self.weight_decay,
                           clip_norm=self.clip_norm, b1=self.b1, b2=self.b2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MOPDConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown MOPD config keys {bad}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> MOPDConfig:
        """From a .json or .yaml file; relative checkpoint paths are read from its folder."""
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                d = yaml.safe_load(f)
            else:
                d = json.load(f)
        base = os.path.dirname(os.path.abspath(path))

        def here(p: str) -> str:
            return p if "://" in p or os.path.isabs(p) else os.path.join(base, p)

        if d.get("student"):
            d["student"] = here(d["student"])
        d["teachers"] = {k: here(v) for k, v in (d.get("teachers") or {}).items()}
        return cls.from_dict(d)

    def override(self, items: list[str]) -> MOPDConfig:
        """`key=value` strings (JSON values, else strings) on top of this config."""
        d = self.to_dict()
        for item in items:
            if "=" not in item:
                raise ValueError(f"--set needs key=value, got {item!r}")
            k, raw = item.split("=", 1)
            try:
                v = json.loads(raw)
            except json.JSONDecodeError:
                v = raw
            d[k.strip()] = v
        return MOPDConfig.from_dict(d)
