"""A few steps of a very small MiMo with every evaluation: checks that a machine or a TPU slice
runs the whole path (train, checkpoint, resume, evaluate) before a real experiment."""

from experiments.lib import scales
from experiments.lib.spec import EvalSpec, Experiment, Scaled, Sweep

_SMALL_MODEL = {"model.num_layers": 2, "model.hidden_size": 32, "model.intermediate_size": 64,
                "model.moe_intermediate_size": 16, "model.num_mtp_layers": 2,
                "model.sliding_attention": {"window": Scaled("window")}}
_QUIET = {"progress_bar": False, "console_every": 1000, "val_every": 1000, "save_every": 2,
          "data.val_batches": 1, "lr": 1e-2, "warmup_steps": 1}

TINY = scales.TINY.with_(batch_size=4, seq_len=64, steps=4, window=8, train=_QUIET)
# The same small model on each slice: minutes, the check that every worker joins in.
TPU = tuple(s.with_(batch_size=s.chips * 4, seq_len=1024, steps=50,
                    train={"model_preset": "tiny", "compute_dtype": "float32",
                           "model.max_position_embeddings": 2048, "warmup_steps": 5,
                           "decay_steps": 0, "save_every": 25})
            for s in (scales.V5P_8, scales.V5E_16, scales.V5P_128))

SWEEP = Sweep(
    name="smoke",
    description="a few steps of a very small MiMo, then every evaluation",
    experiments=(Experiment(
        name="smoke",
        description="train a 2-layer MiMo for a few steps, checkpoint, evaluate",
        scales=(TINY, *TPU),
        train=_SMALL_MODEL,
        evals=(EvalSpec("perplexity"), EvalSpec("mtp"),
               EvalSpec("passkey", {"contexts": (Scaled("window", 8),), "samples": 4})),
        labels={"variant": "smoke", "seed": 0},
    ),),
)
