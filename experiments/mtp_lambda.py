"""MTP loss weight lambda 0.3 (pre-training stage 1), 0.1 (stages 2-3) and 0 (no MTP
training), with the release's 3 MTP heads: the main loss and each head's acceptance."""

from experiments.lib.ablation import BASE, compare, expand, verdict_sentence
from experiments.lib.spec import EvalSpec, Scaled, Sweep

VARIANTS = {f"lambda{lam:g}": {"mtp_lambda": lam} for lam in (0.3, 0.1, 0.0)}
LABELS = {f"lambda{lam:g}": f"lambda {lam:g}" for lam in (0.3, 0.1, 0.0)}



def verdict(rows: dict) -> str:
    return verdict_sentence([
        compare(rows, "lambda 0.3", "lambda 0", "acceptance_length", lower_is_better=False),
        compare(rows, "lambda 0.1", "lambda 0", "acceptance_length", lower_is_better=False),
        # "does not hurt the main loss"
        compare(rows, "lambda 0.3", "lambda 0", "val_loss", no_worse=True),
        compare(rows, "lambda 0.1", "lambda 0", "val_loss", no_worse=True),
    ])


SWEEP = Sweep(
    name="mtp_lambda",
    description="MTP loss weight 0.3 / 0.1 / 0 with 3 heads: main loss and acceptance per head",
    experiments=expand(
        "mtp_lambda", "MTP weight", VARIANTS, LABELS, seeds=(0, 1),
        base={**BASE, "model.num_mtp_layers": 3,
              "model.sliding_attention": {"window": Scaled("window")}},
        evals=(EvalSpec("perplexity"), EvalSpec("mtp")),
    ),
    claim=("Report: MTP heads (lambda 0.3 then 0.1) give accepted lengths of ~3.6 with 3 heads "
           "and do not hurt the main model; lambda 0 leaves the heads untrained."),
    metrics=("val_loss", "bits_per_byte", "mtp_acc_1", "mtp_acc_2", "mtp_acc_3",
             "acceptance_length"),
    verdict=verdict,
)
