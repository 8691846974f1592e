"""Post-training: multi-teacher on-policy distillation (MOPD, MiMo-V2-Flash report §4.4) with
rollout routing replay and IcePop, and answer-only supervised fine-tuning.

`mopd(MOPDConfig(...), workdir)` runs the loop (`mimo-jax mopd --config FILE`); the pieces:
`rollout` (sampled tokens with the sampling policy's log-probs and routed experts),
`sequence_logprobs` (trainer / teacher scoring, optional routing replay), `mopd_loss` and
`group_advantages` (Eq. 7/9 with IcePop), `TeacherSet`, the tasks with verifiable rewards.
"""

from mimo_jax.post_train.config import MOPDConfig
from mimo_jax.post_train.logprobs import sequence_logprobs
from mimo_jax.post_train.loop import MOPDResult, TeacherSet, mopd
from mimo_jax.post_train.loss import group_advantages, mopd_loss
from mimo_jax.post_train.rollout import Rollout, rollout
from mimo_jax.post_train.tasks import TASKS, make_task

__all__ = [
    "MOPDConfig",
    "MOPDResult",
    "Rollout",
    "TASKS",
    "TeacherSet",
    "group_advantages",
    "make_task",
    "mopd",
    "mopd_loss",
    "rollout",
    "sequence_logprobs",
]
