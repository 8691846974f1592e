"""Grain pipelines: shuffled, packed, host-sharded training batches and fixed validation batches.

Documents -> [BOS] + tokens + [EOS] -> concatenated and split into rows of `seq_len` tokens
(`ConcatThenSplitIterDataset`: no padding except at the very end of a finite stream) -> batches
of `{"ids", "segment_ids", "positions"}` int32 [B, T]. Segment ids number the documents of a row
from 1 (0 = padding) and positions restart at 0 for every document piece, so attention and the
loss never cross a document boundary. Training epochs reshuffle with a seed derived from
`seed` and the epoch; the iterator state (`get_state`/`set_state`, or Orbax through
`grain.checkpoint.CheckpointSave`) resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np

from mimo_jax.data.sources import DataError, TextFiles
from mimo_jax.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    import grain


def _grain():
    """Grain, imported on first use: splitting documents and the evaluation code need no
    Grain, and accelerator images often lack it."""
    try:
        import grain
        import grain.experimental  # noqa: F401  (ConcatThenSplitIterDataset)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the packed-token data pipeline needs Grain ({e}); install it with "
            "`pip install 'grain>=0.2.18'` (a dependency of mimo-jax)") from e
    return grain


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[int]  # document indices for this host
    val: list[int]  # held-out documents (the same on every host)


def split_documents(
    n_docs: int, val_fraction: float, seed: int, process_index: int = 0, process_count: int = 1
) -> Split:
    """A seeded held-out split by document, then the training documents of this host."""
    if n_docs < 1:
        raise DataError("the corpus has no documents")
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * n_docs)))
    if n_val >= n_docs:
        raise DataError(
            f"{n_docs} documents leave none for training with val_fraction={val_fraction}"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    val = sorted(int(i) for i in perm[:n_val])
    train = sorted(int(i) for i in perm[n_val:])[process_index::process_count]
    if not train:
        raise DataError(f"host {process_index} of {process_count} got no training documents")
    return Split(train, val)


class _Subset:
    def __init__(self, docs, indices: list[int]):
        self.docs, self.indices = docs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.docs[self.indices[i]]


class _Encode:
    """Text -> {"tokens": [BOS] + ids + [EOS]} (specials only when the tokenizer has them)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        parts = [self.tok.encode(text)]
        if self.tok.bos_id is not None:
            parts.insert(0, np.asarray([self.tok.bos_id], np.int32))
        if self.tok.eos_id is not None:
            parts.append(np.asarray([self.tok.eos_id], np.int32))
        return {"tokens": np.concatenate(parts).astype(np.int32)}


def _to_batch(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "ids": x["tokens"].astype(np.int32),
        "segment_ids": x["tokens_segment_ids"].astype(np.int32),
        "positions": x["tokens_positions"].astype(np.int32),
    }


def _require_text(docs, indices: list[int], what: str) -> None:
    """Fail clearly if every document is empty (packing would otherwise wait forever)."""
    if isinstance(docs, TextFiles):
        if any(os.path.getsize(docs.paths[i]) > 0 for i in indices):
            return
    elif any(docs[i] for i in indices):
        return
    raise DataError(f"all {len(indices)} {what} documents are empty")


def packed_dataset(
    docs, indices: list[int], tokenizer: Tokenizer, seq_len: int, *, seed: int | None
) -> grain.IterDataset:
    """Rows of `seq_len` packed tokens; `seed` None = one pass in order, else endless epochs."""
    grain = _grain()
    ds = grain.MapDataset.source(_Subset(docs, indices))
    if seed is not None:
        ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.filter(lambda text: len(text) > 0).map(_Encode(tokenizer))
    return grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(),
                                                         length_struct={"tokens": seq_len})


def train_iterator(
    docs, split: Split, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int
) -> grain.DatasetIterator:
    """The endless training iterator of this host (checkpointable)."""
    _require_text(docs, split.train, "training")
    ds = packed_dataset(docs, split.train, tokenizer, seq_len, seed=seed)
    return iter(ds.batch(batch_size, drop_remainder=True).map(_to_batch))


def validation_batches(
    docs, split: Split, tokenizer: Tokenizer, seq_len: int, batch_size: int, max_batches: int
) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches (the last one padded with empty rows), the same at every eval."""
    if not split.val or max_batches < 1:
        return []
    _require_text(docs, split.val, "validation")
    rows: list[dict[str, np.ndarray]] = []
    for row in packed_dataset(docs, split.val, tokenizer, seq_len, seed=None):
        rows.append(_to_batch(row))
        if len(rows) >= batch_size * max_batches:
            break
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pad = batch_size - len(chunk)
        batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        if pad:  # empty rows: segment id 0 everywhere, so they count for nothing
            batch = {
                k: np.concatenate([v, np.zeros((pad, seq_len), np.int32)]) for k, v in batch.items()
            }
        batches.append(batch)
    return batches
