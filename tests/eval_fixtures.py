"""A tiny transformers checkpoint with a trained BPE tokenizer, for the evaluation tests.

`make_checkpoint(dir)` writes what a user downloads: `save_pretrained` of a random
`MiMoV2FlashForCausalLM` (hybrid full/sliding layers, MoE, sinks; MTP tensors in a second
shard) and a byte-level BPE `tokenizers` tokenizer trained on a few KB of text, wrapped as a
`PreTrainedTokenizerFast` and saved beside it (tokenizer.json + tokenizer_config.json).
"""

from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import tempfile

TOKENS = 320  # model vocabulary; the tokenizer has a few ids fewer (unused model rows)
EOS = "<|endoftext|>"
WORDS = ("the cat dog sat on a mat and ran to house tree river stone light day night "
         "big small red green blue one two three four five six seven eight nine ten "
         "question answer what is plus minus copy word apple pear plum bird fish").split()


def corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """A few KB of word-salad sentences over a small vocabulary (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return out


def train_tokenizer(vocab_size: int = TOKENS - 6, bos: str | None = None):
    """A byte-level BPE `tokenizers.Tokenizer` with EOS (and optionally a BOS template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(corpus())] + corpus(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def save_tokenizer(tok, directory: str, bos: str | None = None) -> None:
    from transformers import PreTrainedTokenizerFast

    kw = {"bos_token": bos} if bos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, **kw)
    fast.save_pretrained(directory)


def make_checkpoint(directory: str, *, seed: int = 0, mtp_layers: int = 1) -> None:
    """Tiny random MiMo (4 layers: full + 3 sliding with a window of 8 keys, 4 experts top-2,
    MTP heads) and the BPE tokenizer, as transformers saves them."""
    import torch
    from convert_util import save_with_mtp, tiny_model

    model = tiny_model(seed=seed, vocab_size=TOKENS, hidden_size=64, num_hidden_layers=4,
                       head_dim=32, v_head_dim=24, sliding_window=8,
                       max_position_embeddings=512, initializer_range=0.1,
                       eos_token_id=0, bos_token_id=None, pad_token_id=None)
    save_with_mtp(model, directory, dtype=torch.float32, mtp_layers=mtp_layers)
    save_tokenizer(train_tokenizer(), directory)


@functools.cache
def checkpoint_dir() -> str:
    """One checkpoint per test process, shared by every eval test module."""
    root = tempfile.mkdtemp(prefix="mimo-jax-eval-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    path = os.path.join(root, "ckpt")
    make_checkpoint(path)
    return path
