"""Hybrid ratio: sliding:global 3:1, 5:1 (the release) and 7:1, sliding window W with a sink.
8 layers: global at 0, 3, 7 (3:1), at 0, 5 (5:1) and at 0, 7 (7:1)."""

from experiments.lib.ablation import compare, expand, verdict_sentence
from experiments.lib.spec import LayerPattern, Scaled, Sweep

VARIANTS = {
    f"{n}to1": {"model.num_layers": 8, "model.layer_types": LayerPattern(n),
                "model.sliding_attention": {"window": Scaled("window"), "has_sink": True}}
    for n in (3, 5, 7)
}
LABELS = {f"{n}to1": f"{n}:1" for n in (3, 5, 7)}



def verdict(rows: dict) -> str:
    return verdict_sentence([
        compare(rows, "5:1", "7:1", "val_loss"),  # fewer global layers cost loss
        compare(rows, "5:1", "3:1", "val_loss", no_worse=True),  # 5:1 keeps quality
        compare(rows, "5:1", "7:1", "passkey_gain@16W", lower_is_better=False,
                noise=0.05),
    ])


SWEEP = Sweep(
    name="hybrid_ratio",
    description="sliding:global layer ratio 3:1 / 5:1 / 7:1 at equal depth",
    experiments=expand("hybrid_ratio", "hybrid ratio", VARIANTS, LABELS, seeds=(0, 1)),
    claim=("Report: 5:1 (with a 128 window and sinks) keeps quality while cutting KV cache and "
           "attention compute ~6x; it reports no ratio sweep, so fewer global layers should cost "
           "little validation loss but long-range retrieval."),
    metrics=("val_loss", "bits_per_byte", "passkey@4W", "passkey@16W", "passkey_gain@4W",
             "passkey_gain@16W"),
    verdict=verdict,
)
