"""Perplexity and bits per byte of a model on any corpus the training data pipeline reads.

The text goes through the training pipeline (`mimo_jax.data`): documents -> [BOS] tokens [EOS]
-> packed rows of `seq_len` tokens with segment ids and per-document positions. A position's
target is the next token of the same document (`train.loss.shifted_targets`), so scored tokens
are exactly the ones the training loss counts: every token of a document except the first
of each row piece (BOS, or a document continued from the previous row, which restarts there
without context, as in training). EOS is scored; it stands for no bytes.

- `nll`: mean negative log-likelihood per scored token, in nats; `perplexity = exp(nll)`;
- `bits_per_byte`: total NLL / ln 2 / total UTF-8 bytes of the scored tokens' text
  (`data.tokenizer.token_byte_lengths`), comparable across tokenizers.

One jitted function of fixed shape [B, T] scores every batch (the last one is padded with
empty rows: segment id 0 counts for nothing), so a whole corpus compiles once; logits exist
for `logits_chunk` tokens at a time, and only per-row sums leave the device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.data.pipeline import packed_dataset, split_documents
from mimo_jax.data.sources import DataError, open_source
from mimo_jax.data.tokenizer import Tokenizer, load_tokenizer, token_byte_lengths
from mimo_jax.model.mimo import MiMo
from mimo_jax.train.loss import shifted_targets

Batch = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------- the corpus
@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents to score, read like training data.

    source: "stdlib", comma-separated files/directories/globs (text, JSONL, Parquet,
      ArrayRecord; see `mimo_jax.data.open_source`), or a list of document strings.
    split: "all" documents, or the "val" / "train" side of the held-out split a training run
      with the same `val_fraction` and `seed` uses (`TrainConfig.data`).
    max_documents: score only the first N documents of the split (in corpus order).
    """

    source: str | Sequence[str] = "stdlib"
    kind: str = "auto"
    field: str = "text"
    split: str = "all"
    val_fraction: float = 0.02
    seed: int = 0
    max_documents: int | None = None

    @classmethod
    def from_data_config(cls, data: Any, split: str = "val", **changes: Any) -> Corpus:
        """The corpus of a training run's `TrainConfig.data` (default: its held-out split)."""
        return cls(source=data.source, kind=data.kind, field=data.field, split=split,
                   val_fraction=data.val_fraction, seed=data.seed, **changes)

    def open(self) -> tuple[Any, list[int]]:
        """(document source, indices of the documents to score)."""
        if isinstance(self.source, str):
            docs = open_source(self.source, self.kind, self.field)
        else:
            docs = list(self.source)
            if not all(isinstance(d, str) for d in docs):
                raise DataError("a corpus given as a list must hold document strings")
            if not docs:
                raise DataError("the corpus has no documents")
        if self.split == "all":
            indices = list(range(len(docs)))
        elif self.split in ("val", "train"):
            split = split_documents(len(docs), self.val_fraction, self.seed)
            indices = split.val if self.split == "val" else split.train
            if not indices:
                raise DataError(f"val_fraction={self.val_fraction} leaves no held-out documents")
        else:
            raise ValueError(f"unknown split {self.split!r}; want 'all', 'val' or 'train'")
        if self.max_documents is not None:
            indices = indices[: max(int(self.max_documents), 0)]
        if not indices:
            raise DataError("no documents to score (max_documents=0?)")
        return docs, indices


def as_tokenizer(tokenizer: Tokenizer | Mapping[str, Any] | str | None) -> Tokenizer | None:
    """A tokenizer from an object, a spec dict, or a path to a tokenizer.json (or its folder)."""
    if tokenizer is None or hasattr(tokenizer, "encode"):
        return tokenizer
    if isinstance(tokenizer, Mapping):
        return load_tokenizer(dict(tokenizer))
    return load_tokenizer({"kind": "hf", "path": str(tokenizer)})


def corpus_rows(corpus: Corpus, tokenizer: Tokenizer, seq_len: int) -> Iterator[dict]:
    """Packed rows {"ids", "segment_ids", "positions"} int32 [seq_len], in corpus order."""
    docs, indices = corpus.open()
    for row in packed_dataset(docs, indices, tokenizer, seq_len, seed=None):
        yield {
            "ids": np.asarray(row["tokens"], np.int32),
            "segment_ids": np.asarray(row["tokens_segment_ids"], np.int32),
            "positions": np.asarray(row["tokens_positions"], np.int32),
        }


def _positions_from_segments(seg_bt: np.ndarray) -> np.ndarray:
    """0.. restarting at every document (as `model.mimo.default_positions`), on the host."""
    b, t = seg_bt.shape
    idx = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    starts = np.concatenate([np.ones((b, 1), bool), seg_bt[:, 1:] != seg_bt[:, :-1]], axis=1)
    return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)


def _complete(batch: Batch) -> dict[str, np.ndarray]:
    if "ids" not in batch:
        raise ValueError(f"a batch needs 'ids' [B, T]; got keys {sorted(batch)}")
    ids = np.asarray(batch["ids"], np.int32)
    if ids.ndim != 2:
        raise ValueError(f"batch 'ids' must be [B, T], got shape {ids.shape}")
    seg = batch.get("segment_ids")
    seg = np.ones_like(ids) if seg is None else np.asarray(seg, np.int32)
    pos = batch.get("positions")
    pos = _positions_from_segments(seg) if pos is None else np.asarray(pos, np.int32)
    if seg.shape != ids.shape or pos.shape != ids.shape:
        raise ValueError(
            f"batch shapes differ: ids {ids.shape}, segment_ids {seg.shape}, positions {pos.shape}"
        )
    return {"ids": ids, "segment_ids": seg, "positions": pos}


def fixed_batches(
    rows_or_batches: Iterable[Batch], batch_size: int | None, max_rows: int | None = None
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(batch [B, T], number of real rows) with B fixed: rows (1-D) are grouped `batch_size`
    at a time, batches (2-D) re-cut to `batch_size` rows (default: the first batch's), and the
    last batch padded with empty rows (segment id 0). Stops after `max_rows` rows."""
    pending: list[dict[str, np.ndarray]] = []
    seen, width = 0, None

    def flush():
        n = len(pending)
        out = {k: np.stack([r[k] for r in pending]) for k in ("ids", "segment_ids", "positions")}
        if n < batch_size:
            out = {k: np.concatenate([v, np.zeros((batch_size - n, width), np.int32)])
                   for k, v in out.items()}
        pending.clear()
        return out, n

    for item in rows_or_batches:
        two_d = np.asarray(item["ids"]).ndim == 2
        batch = _complete(item if two_d else {k: np.asarray(v)[None] for k, v in item.items()})
        if width is None:
            width = batch["ids"].shape[1]
            batch_size = batch_size or batch["ids"].shape[0]
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        elif batch["ids"].shape[1] != width:
            raise ValueError(
                f"all batches must have the same length T (one compiled shape): got "
                f"{batch['ids'].shape[1]} after {width}"
            )
        for i in range(batch["ids"].shape[0]):
            if max_rows is not None and seen >= max_rows:
                break
            pending.append({k: v[i] for k, v in batch.items()})
            seen += 1
            if len(pending) == batch_size:
                yield flush()
        if max_rows is not None and seen >= max_rows:
            break
    if pending:
        yield flush()


def scoring_batches(
    data: Corpus | str | Sequence[str] | Iterable[Batch],
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    batch_size: int,
    max_rows: int | None,
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Fixed-shape batches from a corpus, a source string or a list of document strings
    (these need the tokenizer), or from ready batches/rows."""
    if isinstance(data, str):
        data = Corpus(source=data)
    elif isinstance(data, Sequence) and data and all(isinstance(d, str) for d in data):
        data = Corpus(source=list(data))  # documents
    if isinstance(data, Corpus):
        if tokenizer is None:
            raise ValueError("scoring a text corpus needs a tokenizer (tokenizer=...)")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        data = corpus_rows(data, tokenizer, seq_len)
    return fixed_batches(data, batch_size, max_rows)


# ----------------------------------------------------------------------------- on the device
def token_statistics(
    h_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token, in float32: (NLL of the target, argmax id, entropy in nats) of the softmax
    of h @ w, with [chunk, V] logits at a time."""
    n, d = h_nd.shape

    def one_chunk(h_cd, t_c):
        logits_cv = jnp.einsum("cd,dv->cv", h_cd, w_dv.astype(h_cd.dtype),
                               preferred_element_type=jnp.float32)
        lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
        picked_c = jnp.take_along_axis(logits_cv, t_c[:, None], axis=-1)[:, 0]
        p_cv = jnp.exp(logits_cv - lse_c[:, None])
        entropy_c = lse_c - jnp.sum(p_cv * logits_cv, axis=-1)
        return lse_c - picked_c, jnp.argmax(logits_cv, axis=-1).astype(jnp.int32), entropy_c

    if n <= chunk:
        return one_chunk(h_nd, targets_n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h_kcd = jnp.pad(h_nd, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t_kc = jnp.pad(targets_n, (0, pad)).reshape(n_chunks, chunk)
    outs = jax.lax.map(lambda xs: one_chunk(*xs), (h_kcd, t_kc))
    return tuple(o.reshape(-1)[:n] for o in outs)


def output_weights(model: MiMo) -> jax.Array:
    """[D, V]: the LM head (the transposed embedding when tied)."""
    return model.embed[...].T if model.lm_head is None else model.lm_head[...]


class CompiledScorer:
    """`fn(model, batch, *extra, *static)` jitted over the split model. The jitted function is
    kept per (fn, model structure, static) so later calls reuse its executables;
    `compilations` counts the traces (one per new input shape) since this scorer was made."""

    _cache: collections.OrderedDict = collections.OrderedDict()
    _max_cached = 16

    def __init__(self, model: MiMo, fn, static: tuple = ()):
        self.graphdef, self.state = nnx.split(model)
        key = (fn, self.graphdef, static)
        entry = self._cache.get(key)
        if entry is None:
            counter = [0]
            graphdef = self.graphdef

            def traced(state, batch, *extra):
                counter[0] += 1
                return fn(nnx.merge(graphdef, state), batch, *extra, *static)

            entry = (jax.jit(traced), counter)
            self._cache[key] = entry
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        self._jit, self._counter = entry
        self._start = self._counter[0]

    @property
    def compilations(self) -> int:
        return self._counter[0] - self._start

    def __call__(self, batch: dict[str, np.ndarray], *extra):
        return self._jit(self.state, {k: jnp.asarray(v) for k, v in batch.items()}, *extra)


def _row_sums(model: MiMo, batch, bytes_v, chunk: int):
    ids_bt, seg_bt = batch["ids"], batch["segment_ids"]
    out = model(ids_bt, positions=batch["positions"], segment_ids=seg_bt, compute_mtp=False,
                compute_logits=False)
    b, t, d = out.hidden.shape
    tgt_bt, valid_bt = shifted_targets(ids_bt, seg_bt, 1)
    nll_n, _, _ = token_statistics(out.hidden.reshape(-1, d), output_weights(model),
                                   tgt_bt.reshape(-1), chunk)
    nll_bt = nll_n.reshape(b, t) * valid_bt
    bytes_bt = jnp.take(bytes_v, tgt_bt) * valid_bt
    return jnp.sum(nll_bt, 1), jnp.sum(valid_bt, 1), jnp.sum(bytes_bt, 1)


# ----------------------------------------------------------------------------- the API
@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll: float  # mean NLL per scored token, nats
    perplexity: float  # exp(nll)
    bits_per_byte: float | None  # total NLL / ln 2 / UTF-8 bytes (None without a tokenizer)
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored tokens' text (0 without a tokenizer)
    rows: int  # packed rows scored (padding rows excluded)
    compilations: int  # new compilations (1 per batch shape; 0 when already compiled)
    seconds: float  # wall time, compilation included

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bits_per_token": self.bits_per_token}


def perplexity(
    model: MiMo,
    data: Corpus | str | Sequence[str] | Iterable[Batch],
    *,
    tokenizer: Tokenizer | Mapping[str, Any] | str | None = None,
    seq_len: int = 1024,
    batch_size: int = 8,
    max_rows: int | None = None,
    logits_chunk: int = 4096,
) -> PerplexityResult:
    """Mean NLL, perplexity and bits per byte of `model` on `data`.

    Args:
      data: a `Corpus` (or a source string such as "stdlib" or "docs/,more.jsonl", or a list
        of document strings), read
        through the training pipeline with `tokenizer` into rows of `seq_len`; or an
        iterable of ready batches/rows {"ids", "segment_ids"?, "positions"?} of one length
        (then `tokenizer` is only needed for bits per byte).
      tokenizer: a tokenizer, its spec dict, or a tokenizer.json path; it must be the one the
        model was trained with.
      batch_size: rows per compiled batch (results do not depend on it).
      max_rows: score at most this many packed rows.
      logits_chunk: tokens whose [chunk, vocab] float32 logits exist at once.
    """
    t0 = time.perf_counter()
    tok = as_tokenizer(tokenizer)
    seq_len = min(seq_len, model.cfg.max_position_embeddings)
    vocab = model.cfg.vocab_size
    if tok is not None and tok.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model vocabulary is {vocab}: "
            "it is not the tokenizer this model was trained with"
        )
    bytes_v = jnp.asarray(
        token_byte_lengths(tok, vocab) if tok is not None else np.zeros((vocab,), np.int32)
    )
    scorer = CompiledScorer(model, _row_sums, (logits_chunk,))
    nll = count = n_bytes = 0.0
    rows = 0
    pending = None
    batches = scoring_batches(data, tok, seq_len=seq_len, batch_size=batch_size,
                              max_rows=max_rows)
    for batch, n_real in batches:
        out = scorer(batch, bytes_v)  # dispatched; read back the previous batch meanwhile
        if pending is not None:
            nll, count, n_bytes = _accumulate(pending, nll, count, n_bytes)
        pending = out
        rows += n_real
    if pending is not None:
        nll, count, n_bytes = _accumulate(pending, nll, count, n_bytes)
    if count == 0:
        raise ValueError("nothing to score: no position has a next token in its document")
    mean = nll / count
    return PerplexityResult(
        nll=mean,
        perplexity=math.exp(min(mean, 700.0)),
        bits_per_byte=(nll / math.log(2) / n_bytes) if tok is not None and n_bytes else None,
        tokens=int(count),
        bytes=int(n_bytes),
        rows=rows,
        compilations=scorer.compilations,
        seconds=time.perf_counter() - t0,
    )


def _accumulate(out, nll: float, count: float, n_bytes: float) -> tuple[float, float, float]:
    s, c, by = (np.asarray(x, np.float64) for x in jax.device_get(out))
    return nll + float(s.sum()), count + float(c.sum()), n_bytes + float(by.sum())
