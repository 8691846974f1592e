"""The `mimo-jax` model for EleutherAI's lm-evaluation-harness.

Registered under "mimo-jax" (and "mimo_jax") when `mimo_jax.eval` is imported:

    import mimo_jax.eval, lm_eval
    lm_eval.simple_evaluate(model="mimo-jax", model_args="pretrained=PATH,batch_size=auto",
                           tasks=["hellaswag"])

- `loglikelihood`: lm-eval's tokenisation boundary (TemplateLM) and the `hf` backend's left
  truncation to `max_length`; requests are deduplicated, packed into a few bucket lengths and
  scored by one compiled program per bucket (`mimo_jax.eval.packing`).
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length`, every window of
  every document packed and scored together.
- `generate_until`: `mimo_jax.generate` (ring KV cache, optional MTP speculation), greedy or
  sampled, batched; stop strings are checked between rounds of doubling length and cut as
  lm-eval does.

Arguments (model_args "key=value,..."): pretrained (HF/release dir incl. FP8, Orbax dir, or a
training workdir), tokenizer (a tokenizer.json or its folder, or "byte"; default: beside the
checkpoint), dtype, batch_size (rows per compiled batch, or "auto"), max_length, buckets
("128:512:2048"), max_batch_tokens, mesh ("fsdp=-1", "data=2,fsdp=4"), sharding (a
`ShardingRules` preset), speculative (K MTP drafts for generation), max_gen_toks, seed,
add_bos_token, prefix_token_id, logits_chunk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mimo_jax.checkpoint.loading import load
from mimo_jax.core.logs import Progress
from mimo_jax.eval.packing import (
    Packing,
    Scorer,
    ScoreRequest,
    loglikelihood_request,
    parse_buckets,
)
from mimo_jax.eval.tokenizer import EvalTokenizer, resolve_tokenizer
from mimo_jax.inference import generate
from mimo_jax.model.mimo import MiMo
from mimo_jax.model.shapes import param_count
from mimo_jax.sharding import ShardingRules, make_mesh

log = logging.getLogger(__name__)


def _parse_batch_size(value: Any) -> int | None:
    """An int, or None for "auto" (lm-eval also spells it "auto:N")."""
    if value is None or (isinstance(value, str) and value.lower().startswith("auto")):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be an integer or 'auto', got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return size


@dataclasses.dataclass
class GenerationStats:
    requests: int = 0
    rounds: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    acceptance_lengths: list[float] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "acceptance_lengths"}
        out["seconds"] = round(self.seconds, 3)
        out["compile_seconds"] = round(self.compile_seconds, 3)
        if self.acceptance_lengths:
            out["mean_acceptance_length"] = round(float(np.mean(self.acceptance_lengths)), 3)
        return out


@register_model("mimo-jax", "mimo_jax")
class MimoLM(TemplateLM):
    """lm-eval model over a `MiMo` (see the module docstring for the arguments)."""

    backend = "causal"

    def __init__(
        self,
        pretrained: str | MiMo | None = None,
        tokenizer: str | EvalTokenizer | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = "auto",
        max_length: int | None = None,
        buckets: str | Sequence[int] | None = None,
        max_batch_tokens: int = 16384,
        max_segments: int = 64,
        logits_chunk: int = 4096,
        mesh: str | jax.sharding.Mesh | None = None,
        sharding: str = "fsdp_tensor_expert",
        speculative: int = 0,
        max_gen_toks: int = 256,
        seed: int = 0,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        progress: bool = True,
        channel: Any = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"mimo-jax: unknown model argument(s) {sorted(unknown)}; see "
                            "mimo_jax.eval.lm_backend for the accepted ones")
        if pretrained is None:
            raise ValueError("mimo-jax needs pretrained=PATH (a checkpoint) or a MiMo model")
        if device not in (None, "", "cpu", "cuda", "tpu") and not str(device).startswith("cuda"):
            log.warning("mimo-jax: device=%s is ignored; JAX places the model", device)
        self._mesh = make_mesh(mesh) if isinstance(mesh, str) and mesh else (mesh or None)
        self._rules = ShardingRules.preset(sharding) if self._mesh is not None else None
        if isinstance(pretrained, MiMo):
            self.model = pretrained
            self._checkpoint = None
        else:
            self._checkpoint = str(pretrained)
            self.model = load(self._checkpoint, dtype=dtype, mesh=self._mesh, rules=self._rules)
        cfg = self.model.cfg
        if isinstance(tokenizer, EvalTokenizer):
            self._tok = tokenizer
        else:
            self._tok = resolve_tokenizer(self._checkpoint, tokenizer)
        if self._tok.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer {self._tok.name} has {self._tok.vocab_size} ids but the model "
                f"vocabulary is {cfg.vocab_size}: it is not this model's tokenizer"
            )
        self.add_bos_token = add_bos_token
        self._custom_prefix = None if prefix_token_id is None else int(prefix_token_id)
        if self._custom_prefix is None and self._tok.bos_id is None and self._tok.eos_id is None:
            raise ValueError(f"the tokenizer {self._tok.name} has neither a BOS nor an EOS token; "
                             "pass prefix_token_id=ID (the token an empty context stands for)")
        self._max_length = int(max_length) if max_length else int(cfg.max_position_embeddings)
        if self._max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self._max_length}")
        self._max_gen_toks = int(max_gen_toks)
        self.speculative = int(speculative)
        if self.speculative and self.speculative > len(self.model.mtp):
            raise ValueError(f"speculative={self.speculative} needs that many MTP heads; the "
                             f"model has {len(self.model.mtp)}")
        self._batch_size = _parse_batch_size(batch_size)
        if max_batch_size:
            max_batch_tokens = min(max_batch_tokens, int(max_batch_size) * self._max_length)
        packing = Packing(parse_buckets(buckets, self._max_length), self._batch_size,
                          int(max_batch_tokens), int(max_segments))
        self.scorer = Scorer(self.model, packing, mesh=self._mesh, rules=self._rules,
                             logits_chunk=int(logits_chunk), channel=channel)
        self.channel = channel
        self.seed = int(seed)
        self.progress = bool(progress)
        self.generation = GenerationStats()
        self._calls = 0

    # ------------------------------------------------------------------ lm-eval's interface
    @property
    def eot_token_id(self) -> int:
        eos = self._tok.eos_id
        return self.prefix_token_id if eos is None else eos

    @property
    def prefix_token_id(self) -> int:
        if self._custom_prefix is not None:
            return self._custom_prefix
        return self._tok.bos_id if self._tok.bos_id is not None else self._tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | str:
        return "auto" if self._batch_size is None else self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self._tok.name.replace("/", "__")

    @property
    def eval_tokenizer(self) -> EvalTokenizer:
        return self._tok

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """As the `hf` backend: the tokenizer's special-token rule, unless the text already
        starts with the prefix token's text."""
        add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        prefix_text = self._tok.decode([self.prefix_token_id], skip_special_tokens=False)
        if add_special_tokens is None and prefix_text and string.startswith(prefix_text):
            add = False
        ids = self._tok.encode(string, add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, (int, np.integer)):
            tokens = [int(tokens)]
        return self._tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_num_parameters": int(param_count(self.model.cfg).total),
            "model_dtype": str(self.model.cfg.dtype),
            "model_revision": "",
            "model_sha": "",
        }

    # ------------------------------------------------------------------ scoring
    def _progress(self, total: int, desc: str, disable: bool) -> Progress:
        return Progress(total, desc=desc, unit="req", enabled=self.progress and not disable)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        for r in requests:
            _, continuation = r.args
            if not continuation:
                raise ValueError(
                    f"loglikelihood request {_where(r)} has an empty continuation: there is "
                    "nothing to score (lm-eval's hf backend fails on it too); fix the task's "
                    "doc_to_target/doc_to_choice"
                )
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        scored = []
        for strings, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError(
                    f"the continuation {strings[1]!r} tokenised to no tokens after context "
                    f"{strings[0][-40:]!r} (the tokenizer merged it into the context)"
                )
            scored.append(loglikelihood_request(context_enc, continuation_enc, self.max_length))
        results = self._score(scored, "Running loglikelihood requests", disable_tqdm)
        for (strings, _, _), res in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, res)
        return results

    def _score(self, scored: list[ScoreRequest], desc: str,
               disable_tqdm: bool) -> list[tuple[float, bool]]:
        with self._progress(len(scored), desc, disable_tqdm) as bar:
            return self.scorer.score(scored, progress=bar.update)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text),
                                              prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, pred in map(make_disjoint_window, pairs):
                windows.append(loglikelihood_request(context, pred, self.max_length))
                owner.append(i)
        scores = self._score(windows, "Running loglikelihood_rolling windows", disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores, strict=True):
            totals[i] += lp
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.channel is not None:
            raise NotImplementedError(
                "generate_until runs on a single process: on several hosts mimo-jax "
                "evaluates loglikelihood and rolling tasks only"
            )
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(args)
        rows = self._batch_size or 16
        with self._progress(len(args), "Running generate_until requests", disable_tqdm) as bar:
            for idxs in groups.values():
                kwargs = normalize_gen_kwargs(args[idxs[0]][1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks"))
                sampling = _sampling(kwargs)
                max_ctx = self.max_length - max_gen
                if max_ctx <= 0:
                    raise ValueError(f"max_gen_toks={max_gen} leaves no room for the context "
                                     f"in max_length={self.max_length}")
                prompts = {i: self.tok_encode(args[i][0])[-max_ctx:] or [self.prefix_token_id]
                           for i in idxs}
                order = sorted(idxs, key=lambda i: (-len(prompts[i]), i))
                # One cache length, prefill chunk and batch width for the whole group: every
                # round of every batch reuses the same two compiled programs.
                longest = len(prompts[order[0]])
                shape = {"rows": min(rows, len(order)),
                         "max_len": min(_pow2(longest + max_gen, 64),
                                        self.model.cfg.max_position_embeddings),
                         "chunk": min(256, _pow2(longest, 16))}
                for start in range(0, len(order), rows):
                    part = order[start:start + rows]
                    texts = self._generate([prompts[i] for i in part], max_gen, until, sampling,
                                           **shape)
                    for i, text in zip(part, texts, strict=True):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", args[i], text)
                    bar.update(len(part))
        self.generation.requests += len(args)
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], max_gen: int, until: list[str],
                  sampling: dict[str, Any], *, rows: int, max_len: int,
                  chunk: int) -> list[str]:
        """Generate for a batch of prompts in rounds of doubling length (16, 32, ...), so that
        rows whose text reached a stop string stop early; EOS stops a row at once. Batches are
        padded to `rows` prompts so that every round has the same shapes."""
        n = len(prompts)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * n
        eot = self.eot_token_id
        remaining, step = max_gen, min(max_gen, 16)
        t0 = time.perf_counter()
        while remaining > 0 and not all(done):
            active = [i for i in range(n) if not done[i]]
            batch = [prompts[i] + new[i] for i in active]
            batch += [[self.prefix_token_id]] * (rows - len(active))
            self._calls += 1
            res = generate(self.model, batch, max_new_tokens=step, stop_tokens=[eot],
                           speculative=self.speculative, max_len=max_len,
                           prefill_chunk_size=chunk, seed=self.seed + self._calls, **sampling)
            self.generation.rounds += 1
            self.generation.compile_seconds += res.compile_seconds
            if res.acceptance_length is not None:
                self.generation.acceptance_lengths.append(res.acceptance_length)
            for row, i in enumerate(active):
                toks = res.tokens[row]
                self.generation.new_tokens += len(toks)
                if eot in toks:
                    toks, done[i] = toks[: toks.index(eot)], True
                new[i] += toks
                text = self.tok_decode(new[i])
                if any(s and s in text for s in until):
                    done[i] = True
            remaining -= step
            step = min(remaining, 2 * step)
        self.generation.seconds += time.perf_counter() - t0
        return [postprocess_generated_text(self.tok_decode(toks), until, None) for toks in new]

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Scoring and generation costs so far (compilations, padding, seconds)."""
        return {"scoring": self.scorer.stats.as_dict(), "generation": self.generation.as_dict(),
                "max_length": self.max_length, "buckets": list(self.scorer.packing.buckets),
                "batch_size": self.batch_size}


def _pow2(x: int, lo: int) -> int:
    return max(lo, 1 << (max(int(x), 1) - 1).bit_length())


def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """temperature/top_p/top_k for `generate` from normalised lm-eval generation kwargs."""
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
    top_k = int(kwargs.pop("top_k", 0) or 0)
    if "max_length" in kwargs:
        kwargs.pop("max_length")
        log.warning("mimo-jax: generation max_length is ignored; use max_gen_toks")
    if kwargs:
        log.warning("mimo-jax: ignoring generation arguments %s", sorted(kwargs))
    if not do_sample:
        return {"temperature": 0.0}
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k}


def _where(request: Any) -> str:
    task = getattr(request, "task_name", None)
    doc = getattr(request, "doc_id", None)
    return f"(task {task}, doc {doc})" if task is not None else repr(request.args)[:80]
