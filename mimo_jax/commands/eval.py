"""`mimo-jax eval`: lm-eval tasks through the `mimo-jax` backend, plus the model's own evals
(perplexity / bits per byte, MTP acceptance, passkey retrieval); results as JSON + markdown."""

from __future__ import annotations

import argparse
import json
import sys

from mimo_jax.commands.common import dtype_arg, fail


def _csv(text: str) -> list[str]:
    return [t for t in (p.strip() for p in text.split(",")) if t]


def _lengths(text: str) -> list[int]:
    try:
        out = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want lengths like 256,512,1024; got {text!r}") from None
    if not out or min(out) < 16:
        raise argparse.ArgumentTypeError(f"passkey lengths must be >= 16 tokens; got {text!r}")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: lm-eval tasks, perplexity, MTP acceptance, passkey",
        description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="HF/release dir (FP8 ok), Orbax dir, or training workdir")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or its folder, or 'byte' (default: beside the checkpoint)")
    p.add_argument("--dtype", type=dtype_arg, default=None,
                   help="parameter/compute dtype (default: the checkpoint's)")
    p.add_argument("--tasks", nargs="+", default=[], metavar="NAME|YAML",
                   help="lm-eval tasks or groups (space or comma separated) or task YAML files;"
                        " offline: mimo_offline, mimo_arith_mc, mimo_text_ppl, mimo_copy_words")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--output", default=None, metavar="DIR",
                   help="write DIR/results.json (lm-eval's results) and DIR/results.md")
    p.add_argument("--batch-size", default="auto",
                   help="packed rows per compiled batch, or 'auto' (~--max-batch-tokens)")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-length", type=int, default=None,
                   help="longest scored window (default: the model's max_position_embeddings)")
    p.add_argument("--buckets", default=None,
                   help="row lengths, e.g. 128:512:2048 (default: powers of two)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. fsdp=-1 or data=2,fsdp=4")
    p.add_argument("--sharding", default="fsdp_tensor_expert", help="ShardingRules preset")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="generate with K MTP draft tokens per step")
    p.add_argument("--include-path", default=None, help="a folder of extra task YAMLs")
    p.add_argument("--gen-kwargs", default=None, help="k=v,... overriding generation settings")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every request and response (DIR/samples_TASK.jsonl)")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap resamples for stderrs (0 = none; lm-eval's default 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perplexity", default=None, metavar="CORPUS",
                   help="perplexity and bits per byte on a corpus (stdlib, files, JSONL, ...)")
    p.add_argument("--mtp-acceptance", default=None, metavar="CORPUS",
                   help="teacher-forced MTP acceptance on a corpus")
    p.add_argument("--mtp-heads", type=int, default=None, help="K for --mtp-acceptance")
    p.add_argument("--seq-len", type=int, default=1024, help="row length for the corpus evals")
    p.add_argument("--max-rows", type=int, default=None, help="rows of the corpus evals at most")
    p.add_argument("--passkey", type=_lengths, default=None, metavar="LENGTHS",
                   help="passkey retrieval at these context lengths, e.g. 256,512,1024")
    p.add_argument("--passkey-trials", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the results as JSON, not markdown")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tasks = [t for item in args.tasks for t in _csv(item)]
    if not (tasks or args.perplexity or args.mtp_acceptance or args.passkey):
        return fail("eval", ValueError(
            "nothing to evaluate: give --tasks and/or --perplexity, --mtp-acceptance, --passkey"))
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return fail("eval", ImportError(
            "mimo-jax eval needs lm-evaluation-harness: pip install 'mimo-jax[eval]'"))
    import jax

    from mimo_jax.core import logs
    from mimo_jax.core.errors import CheckpointError
    from mimo_jax.data.sources import DataError
    from mimo_jax.eval.harness import UnknownTaskError, markdown, run_tasks, write_results
    from mimo_jax.eval.lm_backend import MimoLM
    from mimo_jax.eval.multihost import BatchBroadcast, follow
    from mimo_jax.parallel.distributed import maybe_initialize
    from mimo_jax.sharding import ShardingError

    multi = maybe_initialize()
    leader = jax.process_index() == 0
    channel = BatchBroadcast() if multi else None
    try:
        if multi and (args.perplexity or args.mtp_acceptance):
            raise ValueError("--perplexity and --mtp-acceptance run on one process; "
                             "run them on a single host")
        if multi and not args.mesh:
            raise ValueError("on several processes give --mesh (the model is sharded over all "
                             "hosts' devices)")
        manager = None
        if tasks and leader:
            from mimo_jax.eval.harness import task_manager

            manager = task_manager(tasks, args.include_path)  # unknown names fail first
        logs.info(f"eval: loading {args.checkpoint}")
        lm = MimoLM(pretrained=args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                    batch_size=args.batch_size, max_length=args.max_length,
                    buckets=args.buckets, max_batch_tokens=args.max_batch_tokens,
                    mesh=args.mesh, sharding=args.sharding, speculative=args.speculative,
                    seed=args.seed, progress=logs.verbosity() != "quiet",
                    channel=channel if leader else None)
        if multi and not leader:
            n = follow(lm.scorer, channel)
            logs.info(f"eval: process {jax.process_index()} ran {n} batches from process 0")
            return 0
        results: dict = {}
        extra: dict = {}
        if tasks:
            limit = None if args.limit is None else (
                int(args.limit) if args.limit >= 1 else args.limit)
            results = run_tasks(lm, tasks, limit=limit, num_fewshot=args.num_fewshot,
                                include_path=args.include_path, log_samples=args.log_samples,
                                bootstrap_iters=args.bootstrap_iters, seed=args.seed,
                                gen_kwargs=args.gen_kwargs, manager=manager)
        if args.passkey:
            from mimo_jax.eval.passkey import passkey_retrieval

            logs.info(f"eval: passkey retrieval at {args.passkey} tokens")
            lengths = [n for n in args.passkey if n <= lm.max_length]
            if len(lengths) < len(args.passkey):
                raise ValueError(f"passkey lengths {args.passkey} exceed max_length "
                                 f"{lm.max_length}; raise --max-length")
            res = passkey_retrieval(None, lm.eval_tokenizer, lengths=lengths,
                                    trials=args.passkey_trials, seed=args.seed,
                                    scorer=lm.scorer)
            extra["passkey retrieval"] = res.rows
        if args.perplexity:
            from mimo_jax.eval.perplexity import perplexity

            logs.info(f"eval: perplexity on {args.perplexity}")
            res = perplexity(lm.model, args.perplexity, tokenizer=lm.eval_tokenizer.spec,
                             seq_len=args.seq_len, max_rows=args.max_rows)
            extra["perplexity"] = res.as_dict()
        if args.mtp_acceptance:
            from mimo_jax.eval.mtp import mtp_acceptance

            logs.info(f"eval: MTP acceptance on {args.mtp_acceptance}")
            res = mtp_acceptance(lm.model, args.mtp_acceptance,
                                 tokenizer=lm.eval_tokenizer.spec, num_heads=args.mtp_heads,
                                 seq_len=args.seq_len, max_rows=args.max_rows)
            extra["MTP acceptance"] = res.summary()
        results["mimo_jax"] = lm.stats()  # every scoring call so far (passkey included)
    except (ValueError, FileNotFoundError, NotImplementedError, UnknownTaskError,
            CheckpointError, DataError, ShardingError) as e:
        if channel is not None and leader:
            channel.stop()
        return fail("eval", e)
    if channel is not None:
        channel.stop()
    if args.output:
        paths = write_results(results, args.output, extra or None)
        logs.info(f"eval: wrote {paths['json']} and {paths['markdown']}")
    if args.json:
        from lm_eval.utils import handle_non_serializable

        payload = {k: v for k, v in results.items() if k != "samples"}
        print(json.dumps({**payload, **({"evals": extra} if extra else {})},
                         default=handle_non_serializable, indent=1))
    else:
        sys.stdout.write(markdown(results, extra or None))
    return 0
