"""Training data: tokenizers, document sources, and Grain packing pipelines."""

from mimo_jax.data.pipeline import Split, split_documents, train_iterator, validation_batches
from mimo_jax.data.sources import DataError, open_source
from mimo_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "Split",
    "load_tokenizer",
    "open_source",
    "split_documents",
    "train_iterator",
    "validation_batches",
]
