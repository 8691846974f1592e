"""Fixed-shape scoring: requests packed into rows of a few bucket lengths, one program per bucket.

A request is a model input and the tokens its last positions must predict (lm-eval's
(context, continuation) after its left truncation; a rolling-perplexity window). Requests are
sorted by length and packed best-fit into rows of the smallest bucket that holds them, several
per row with their own segment id and positions (attention never crosses segments; the MoE is
dropless, so a request's score does not depend on its neighbours). Rows are cut into batches of
a fixed number of rows per bucket (the last one padded with empty rows), so a task compiles one
program per bucket. Inside that program the model runs, the LM head is applied only at scored
positions (a fixed number P per row, chunked), and only per-request sums of log-probabilities
and "every token greedy" flags leave the device.

    scorer = Scorer(model, Packing(buckets=(128, 512, 2048)))
    scorer.score([ScoreRequest(tokens=(5, 8, 13), targets=(8, 13))])  # -> [(logprob, greedy)]
    scorer.stats.as_dict()  # compilations per bucket, padding fraction, seconds
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.model.mimo import MiMo
from mimo_jax.sharding.rules import ShardingRules, activate, activation_sharding

# Incremented while tracing the scoring program (never while running it): one per compilation.
TRACE_COUNTS: collections.Counter = collections.Counter()

# The arrays of a packed batch, in the order the program takes them; all int32 [R, T] or [R, P].
ARRAY_NAMES = ("ids", "positions", "segment_ids", "score_pos", "score_label", "score_slot")


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """Model input `tokens` whose last len(targets) positions predict `targets`:
    tokens[n - m + j] predicts targets[j] (n = len(tokens), m = len(targets))."""

    tokens: tuple[int, ...]
    targets: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("a score request needs at least one target token")
        if len(self.targets) > len(self.tokens):
            raise ValueError(f"{len(self.targets)} targets need at least as many input tokens; "
                             f"got {len(self.tokens)}")


def loglikelihood_request(context: Sequence[int], continuation: Sequence[int],
                          max_length: int) -> ScoreRequest:
    """lm-eval's causal scoring of `continuation` after `context` (the `hf` backend's rule):
    input = (context + continuation)[-(max_length + 1):][:-1], the continuation predicted by
    the input's last positions; contexts too long lose tokens on the left."""
    if not continuation:
        raise ValueError("the continuation is empty (no tokens to score)")
    if not context:
        raise ValueError("the context is empty: lm-eval scores after at least one token "
                         "(the prefix token, BOS or EOS)")
    if len(continuation) > max_length:
        raise ValueError(f"the continuation has {len(continuation)} tokens, more than "
                         f"max_length={max_length}: it cannot be scored in one window")
    whole = [*context, *continuation][-(max_length + 1):]
    return ScoreRequest(tuple(int(t) for t in whole[:-1]), tuple(int(t) for t in continuation))


def default_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_length` (which is always the last bucket)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


def parse_buckets(value: str | Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    """Bucket lengths from "128:512:2048" (or "128|512", a list); None = `default_buckets`.
    Lengths above `max_length` are dropped and `max_length` itself is always a bucket."""
    if value is None or value == "":
        return default_buckets(max_length)
    if isinstance(value, str):
        parts = [p for p in value.replace("|", ":").replace(" ", ":").split(":") if p]
        try:
            lengths = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"bad buckets {value!r}: want lengths like '128:512:2048'") from None
    elif isinstance(value, int):
        lengths = [value]
    else:
        lengths = [int(v) for v in value]
    if any(b < 1 for b in lengths):
        raise ValueError(f"bucket lengths must be >= 1, got {lengths}")
    return tuple(sorted({b for b in lengths if b < max_length} | {max_length}))


def _pow2_at_least(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Packing:
    """How requests become fixed shapes.

    buckets: row lengths, ascending; the last one is the longest input accepted.
    batch_size: rows per batch, the same for every bucket; None ("auto"): at most
      `max_batch_tokens` tokens per batch, the rows a call needs spread evenly over the
      fewest batches (one shape per bucket and call: lm-eval makes one call per request type).
    max_segments: requests per row at most (the per-row output width).
    row_multiple: rows per batch are rounded up to a multiple of this (the data-parallel ways).
    """

    buckets: tuple[int, ...]
    batch_size: int | None = None
    max_batch_tokens: int = 16384
    max_segments: int = 64
    row_multiple: int = 1

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be distinct ascending lengths, got {self.buckets}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (auto), got {self.batch_size}")
        if self.max_segments < 1 or self.max_batch_tokens < 1 or self.row_multiple < 1:
            raise ValueError("max_segments, max_batch_tokens and row_multiple must be >= 1")

    @property
    def max_length(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, length: int) -> int:
        i = bisect.bisect_left(self.buckets, length)
        if i == len(self.buckets):
            raise ValueError(f"a request of {length} tokens is longer than the longest bucket "
                             f"({self.max_length} = max_length)")
        return self.buckets[i]

    def slots(self, bucket: int) -> int:
        return min(self.max_segments, bucket)

    def rows_per_batch(self, bucket: int, rows_needed: int) -> int:
        """Rows per batch of `bucket` when a call needs `rows_needed` rows of it. Auto: as
        few batches as the token budget allows, the rows spread evenly over them, so that
        padding rows number fewer than the batches."""
        if self.batch_size is not None:
            rows = self.batch_size
        else:
            budget = max(1, self.max_batch_tokens // bucket)
            n_batches = -(-max(rows_needed, 1) // budget)
            rows = -(-max(rows_needed, 1) // n_batches)
        return -(-rows // self.row_multiple) * self.row_multiple


@dataclasses.dataclass
class Row:
    bucket: int
    used: int = 0
    members: list[int] = dataclasses.field(default_factory=list)  # request indices, in order


def pack_rows(lengths: Sequence[int], packing: Packing) -> list[Row]:
    """Best-fit decreasing: longest requests first, each into the open row whose free space
    fits it most tightly (any bucket), else a new row of its own bucket. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row index) of rows with room
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            _, r = free.pop(j)
            row = rows[r]
        else:
            row, r = Row(packing.bucket_for(n)), len(rows)
            rows.append(row)
        row.members.append(i)
        row.used += n
        if row.bucket - row.used > 0 and len(row.members) < packing.slots(row.bucket):
            bisect.insort(free, (row.bucket - row.used, r))
    return rows


@dataclasses.dataclass
class PackedBatch:
    bucket: int
    arrays: dict[str, np.ndarray]  # ARRAY_NAMES -> int32 [R, T] / [R, P]
    owners: list[tuple[int, int, int]]  # (row, slot, request index)
    real_rows: int
    real_tokens: int


def make_batches(requests: Sequence[ScoreRequest], packing: Packing) -> list[PackedBatch]:
    """Pack `requests` and cut the rows into fixed-shape batches, bucket by bucket."""
    rows = pack_rows([len(r.tokens) for r in requests], packing)
    by_bucket: dict[int, list[Row]] = collections.defaultdict(list)
    for row in rows:
        by_bucket[row.bucket].append(row)
    batches = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        n_rows = packing.rows_per_batch(bucket, len(group))
        # Scored positions per row: one width for the whole bucket (one program per bucket).
        most = max(sum(len(requests[i].targets) for i in row.members) for row in group)
        width = min(bucket, max(8, _pow2_at_least(most)))
        for start in range(0, len(group), n_rows):
            batches.append(_fill(requests, group[start:start + n_rows], bucket, n_rows, width,
                                 packing.slots(bucket)))
    return batches


def _fill(requests, rows: list[Row], bucket: int, n_rows: int, width: int,
          n_slots: int) -> PackedBatch:
    a = {name: np.zeros((n_rows, bucket if i < 3 else width), np.int32)
         for i, name in enumerate(ARRAY_NAMES)}
    a["score_slot"][:] = n_slots  # unused scored slots land in a dropped column
    owners, tokens = [], 0
    for r, row in enumerate(rows):
        offset, p = 0, 0
        for slot, i in enumerate(row.members):
            req = requests[i]
            n, m = len(req.tokens), len(req.targets)
            a["ids"][r, offset:offset + n] = req.tokens
            a["positions"][r, offset:offset + n] = np.arange(n)
            a["segment_ids"][r, offset:offset + n] = slot + 1
            a["score_pos"][r, p:p + m] = offset + n - m + np.arange(m)
            a["score_label"][r, p:p + m] = req.targets
            a["score_slot"][r, p:p + m] = slot
            owners.append((r, slot, i))
            offset, p, tokens = offset + n, p + m, tokens + n
    return PackedBatch(bucket, a, owners, len(rows), tokens)


# ----------------------------------------------------------------------------- on the device
def target_scores(model: MiMo, h_rpd: jax.Array, labels_rp: jax.Array,
                  chunk: int) -> tuple[jax.Array, jax.Array]:
    """(log p(label) float32 [R, P], label == argmax [R, P]) from hidden states at scored
    positions; [R, c, V] float32 logits with R * c <= `chunk` exist at a time."""
    r, p, d = h_rpd.shape

    def one(h_rcd, lab_rc):
        logits = model.lm_logits(h_rcd).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, lab_rc[..., None], axis=-1)[..., 0]
        return picked - lse, jnp.argmax(logits, axis=-1) == lab_rc

    c = max(1, chunk // r)
    if p <= c:
        return one(h_rpd, labels_rp)
    n = -(-p // c)
    h = jnp.pad(h_rpd, ((0, 0), (0, n * c - p), (0, 0))).reshape(r, n, c, d).swapaxes(0, 1)
    lab = jnp.pad(labels_rp, ((0, 0), (0, n * c - p))).reshape(r, n, c).swapaxes(0, 1)
    lp, greedy = jax.lax.map(lambda xs: one(*xs), (h, lab))
    return (lp.swapaxes(0, 1).reshape(r, n * c)[:, :p],
            greedy.swapaxes(0, 1).reshape(r, n * c)[:, :p])


def score_rows(graphdef, n_slots: int, chunk: int, state, ids, positions, segment_ids,
               score_pos, score_label, score_slot):
    """Per (row, slot): summed log-probability of its targets, and whether all were greedy."""
    TRACE_COUNTS["score"] += 1
    model = nnx.merge(graphdef, state)
    out = model(ids, positions=positions, segment_ids=segment_ids, compute_mtp=False,
                compute_logits=False)
    h_rpd = jnp.take_along_axis(out.hidden, score_pos[:, :, None], axis=1)
    lp_rp, greedy_rp = target_scores(model, h_rpd, score_label, chunk)
    used = score_slot < n_slots
    rows = jnp.arange(ids.shape[0])[:, None]
    sums = jnp.zeros((ids.shape[0], n_slots + 1), jnp.float32)
    sums = sums.at[rows, score_slot].add(jnp.where(used, lp_rp, 0.0))
    misses = jnp.zeros((ids.shape[0], n_slots + 1), jnp.int32)
    misses = misses.at[rows, score_slot].add((used & ~greedy_rp).astype(jnp.int32))
    return sums[:, :n_slots], misses[:, :n_slots] == 0


# ----------------------------------------------------------------------------- statistics
@dataclasses.dataclass
class ScoreStats:
    """What scoring cost, over every call of one `Scorer`."""

    requests: int = 0
    unique_requests: int = 0
    batches: int = 0
    rows: int = 0  # rows holding at least one request
    row_slots: int = 0  # rows computed, padding rows included
    tokens: int = 0  # request tokens computed
    token_slots: int = 0  # positions computed (rows x bucket), padding included
    compilations: int = 0
    compilations_by_bucket: dict[int, int] = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    run_seconds: float = 0.0  # wall time of score() calls, compilation excluded

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.token_slots if self.token_slots else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["compilations_by_bucket"] = {str(k): v for k, v in
                                         sorted(self.compilations_by_bucket.items())}
        out["padding_fraction"] = round(self.padding_fraction, 4)
        out["compile_seconds"] = round(self.compile_seconds, 3)
        out["run_seconds"] = round(self.run_seconds, 3)
        return out


# ----------------------------------------------------------------------------- the scorer
class Scorer:
    """Scores `ScoreRequest`s with one compiled program per (bucket, rows, scored width).

    mesh/rules: the model's parameters already live on `mesh` (`mimo_jax.load(path,
      mesh=mesh)`); batches are split over the mesh axes of the "batch" rule.
    channel: on several processes, process 0's `BatchBroadcast`: every batch is sent to the
      other processes (running `mimo_jax.eval.multihost.follow`) before it runs.
    """

    def __init__(self, model: MiMo, packing: Packing, *, mesh: jax.sharding.Mesh | None = None,
                 rules: ShardingRules | None = None, logits_chunk: int = 4096,
                 channel: Any = None) -> None:
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        self.rules = rules or (ShardingRules.preset() if mesh is not None else None)
        if mesh is not None:
            ways = math.prod(mesh.shape[a] for a in self.rules.mesh_axes("batch"))
            packing = dataclasses.replace(packing, row_multiple=math.lcm(packing.row_multiple,
                                                                         ways))
        self.packing = packing
        self.logits_chunk = int(logits_chunk)
        self.channel = channel
        self.stats = ScoreStats()
        self._executables: dict[tuple, Any] = {}

    # -------------------------------------------------------------- one batch
    def _place(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        sharding = activation_sharding(self.mesh, self.rules, x.shape, ("batch", None))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _executable(self, args: list[jax.Array]):
        ids = args[0]
        key = tuple((a.shape, getattr(a, "sharding", None)) for a in args)
        exe = self._executables.get(key)
        if exe is not None:
            return exe
        bucket = ids.shape[1]
        fn = functools.partial(score_rows, self.graphdef, self.packing.slots(bucket),
                               self.logits_chunk)
        t0 = time.perf_counter()
        if self.mesh is None:
            exe = jax.jit(fn).lower(self.state, *args).compile()
        else:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            with activate(self.mesh, self.rules):
                exe = jax.jit(fn, out_shardings=(replicated, replicated)).lower(
                    self.state, *args).compile()
        self.stats.compile_seconds += time.perf_counter() - t0
        self.stats.compilations += 1
        by = self.stats.compilations_by_bucket
        by[bucket] = by.get(bucket, 0) + 1
        self._executables[key] = exe
        return exe

    def run_arrays(self, arrays: Sequence[np.ndarray]):
        """Dispatch one packed batch (ARRAY_NAMES order); returns device (sums, greedy)."""
        args = [self._place(np.asarray(a, np.int32)) for a in arrays]
        return self._executable(args)(self.state, *args)

    # -------------------------------------------------------------- many requests
    def score(self, requests: Sequence[ScoreRequest],
              progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """(summed log-probability of the targets, all targets greedy) per request, in order.

        `progress(n)` is called as n more requests are done."""
        for r in requests:
            if len(r.tokens) > self.packing.max_length:
                raise ValueError(f"a request of {len(r.tokens)} tokens is longer than "
                                 f"max_length={self.packing.max_length}")
            if max(r.tokens) >= self.cfg.vocab_size or max(r.targets) >= self.cfg.vocab_size:
                raise ValueError(f"token ids must be < the model vocabulary "
                                 f"({self.cfg.vocab_size}); got {max(*r.tokens, *r.targets)}")
        unique: dict[ScoreRequest, int] = {}
        first = [unique.setdefault(r, len(unique)) for r in requests]
        distinct = list(unique)
        t0, compiled0 = time.perf_counter(), self.stats.compile_seconds
        batches = make_batches(distinct, self.packing)
        results: list[tuple[float, bool] | None] = [None] * len(distinct)

        def collect(batch: PackedBatch, out) -> None:
            sums, greedy = (np.asarray(x) for x in jax.device_get(out))
            for r, slot, i in batch.owners:
                results[i] = (float(sums[r, slot]), bool(greedy[r, slot]))
            if progress is not None:
                progress(len(batch.owners))

        pending = None
        for batch in batches:
            arrays = [batch.arrays[n] for n in ARRAY_NAMES]
            if self.channel is not None:
                self.channel.send_batch(arrays)
            out = self.run_arrays(arrays)  # runs while the previous batch is read back
            if pending is not None:
                collect(*pending)
            pending = (batch, out)
            st = self.stats
            st.batches += 1
            st.rows += batch.real_rows
            st.row_slots += batch.arrays["ids"].shape[0]
            st.tokens += batch.real_tokens
            st.token_slots += batch.arrays["ids"].size
        if pending is not None:
            collect(*pending)
        self.stats.requests += len(requests)
        self.stats.unique_requests += len(distinct)
        # Wall time of this call without the compilations it triggered.
        compiled = self.stats.compile_seconds - compiled0
        self.stats.run_seconds += time.perf_counter() - t0 - compiled
        return [results[j] for j in first]  # type: ignore[misc]
