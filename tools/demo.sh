#!/usr/bin/env bash
# The main job, on a CPU in under ten minutes: train a byte-level BPE tokenizer and a tiny MiMo
# on the Python standard library, checkpoint it, measure held-out perplexity, bits per byte and
# MTP acceptance, and generate from the checkpoint (plain and MTP-speculative), then print a
# summary table. Rerunning reuses WORKDIR/tokenizer.json and resumes training.
# Extra arguments go to `mimo-jax demo` (e.g. --minutes 2 --workdir runs/demo; see --help).
source "$(dirname "$0")/env.sh" ""  # no extras (a bare `source` would pass our arguments)
# Sized for a CPU. Only the CPU backend starts, so an accelerator plugin installed in the same
# environment (libtpu from the test extras) neither probes for chips nor logs; set
# JAX_PLATFORMS (e.g. cuda, tpu) to run the demo on an accelerator.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec mimo-jax demo "$@"
