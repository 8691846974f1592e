"""Evaluation on several processes: process 0 drives lm-eval, the others follow its batches.

lm-eval is not an SPMD program (it decides what to score on the fly, logs, writes files), but
every process of a multi-host mesh must run the same compiled programs on the same global
batches. As levanter does it: process 0 runs the harness; each fixed-shape batch its `Scorer`
is about to run is first broadcast (`jax.experimental.multihost_utils.broadcast_one_to_all`)
as a small header (what to do, array shapes) plus the int32 arrays; the other processes sit in
`follow`, receive the batch and run the same program on it, until process 0 sends STOP.

    channel = BatchBroadcast()
    if jax.process_index() == 0:
        lm = MimoLM(model=model, tokenizer=tok, mesh=mesh, channel=channel)
        run_harness(lm, tasks)        # every scored batch is broadcast first
        channel.stop()
    else:
        follow(Scorer(model, packing, mesh=mesh))

Generation (`generate_until`) is not broadcast: it runs on single-process setups only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mimo_jax.eval.packing import ARRAY_NAMES

STOP, SCORE = 0, 1
_HEADER = 2 + 2 * len(ARRAY_NAMES)  # kind, number of arrays, then (rows, cols) per array


def _broadcast_one_to_all(tree: Any) -> Any:
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


class BatchBroadcast:
    """Sends (process 0) or receives (the others) scoring batches.

    `broadcast(tree) -> tree`: every process calls it with arrays of the same shapes and gets
    process 0's values (default: `multihost_utils.broadcast_one_to_all`; tests inject a fake)."""

    def __init__(self, broadcast: Callable[[Any], Any] | None = None) -> None:
        self._broadcast = broadcast or _broadcast_one_to_all
        self.sent = 0

    def _header(self, kind: int, arrays: Sequence[np.ndarray]) -> np.ndarray:
        head = np.zeros((_HEADER,), np.int32)
        head[0], head[1] = kind, len(arrays)
        for i, a in enumerate(arrays):
            head[2 + 2 * i: 4 + 2 * i] = a.shape
        return head

    def send_batch(self, arrays: Sequence[np.ndarray]) -> None:
        """Process 0: announce and send one batch (int32 2-D arrays in ARRAY_NAMES order)."""
        arrays = [np.ascontiguousarray(a, np.int32) for a in arrays]
        if len(arrays) != len(ARRAY_NAMES) or any(a.ndim != 2 for a in arrays):
            raise ValueError(f"a batch is {len(ARRAY_NAMES)} int32 [rows, cols] arrays")
        self._broadcast(self._header(SCORE, arrays))
        self._broadcast(tuple(arrays))
        self.sent += 1

    def stop(self) -> None:
        """Process 0: release the followers."""
        self._broadcast(self._header(STOP, []))

    def receive(self) -> list[np.ndarray] | None:
        """The other processes: the next batch, or None when process 0 said STOP."""
        head = np.asarray(self._broadcast(np.zeros((_HEADER,), np.int32)))
        if int(head[0]) == STOP:
            return None
        if int(head[0]) != SCORE or int(head[1]) != len(ARRAY_NAMES):
            raise RuntimeError(f"unexpected broadcast header {head.tolist()}: processes are "
                               "out of step (all must run the same mimo-jax version)")
        shapes = [tuple(int(x) for x in head[2 + 2 * i: 4 + 2 * i]) for i in range(int(head[1]))]
        out = self._broadcast(tuple(np.zeros(s, np.int32) for s in shapes))
        return [np.asarray(a, np.int32) for a in out]


def follow(scorer: Any, channel: BatchBroadcast | None = None,
           on_batch: Callable[[list[np.ndarray], Any], None] | None = None) -> int:
    """Processes other than 0: run every batch process 0 broadcasts through `scorer`
    (a `Scorer` built from the same checkpoint and mesh) until it sends STOP.

    Returns the number of batches run; `on_batch(arrays, outputs)` sees each one (tests)."""
    channel = channel or BatchBroadcast()
    done = 0
    while True:
        arrays = channel.receive()
        if arrays is None:
            return done
        out = scorer.run_arrays(arrays)
        if on_batch is not None:
            on_batch(arrays, out)
        else:
            # Wait for the step so that a failure surfaces here, in step with process 0.
            jax.block_until_ready(out)
        done += 1
