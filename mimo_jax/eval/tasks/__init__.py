"""Offline lm-eval tasks shipped with mimo-jax: data generated here or shipped in this folder,
so they run without a dataset hub (air-gapped TPU VMs, CI).

| task | output type | data |
|---|---|---|
| `mimo_arith_mc` | multiple_choice (acc, acc_norm) | generated sums, 4 choices |
| `mimo_text_ppl` | loglikelihood_rolling (word/byte perplexity, bits per byte) | `texts.jsonl` |
| `mimo_copy_words` | generate_until (exact_match) | generated word lists to repeat |
| `mimo_offline` | group of the three | |

`lm_eval --include_path <this folder>` (or `mimo-jax eval --tasks mimo_offline`) finds them.
"""

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
SHIPPED_TASKS = ("mimo_arith_mc", "mimo_text_ppl", "mimo_copy_words", "mimo_offline")
