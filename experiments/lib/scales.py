"""The scales experiments are declared at: a CPU run and TPU VM slices.

TPU slice facts (Cloud TPU docs): v5p-N counts TensorCores, 2 per chip, 4 chips per host, so
v5p-8 is 4 chips on 1 host and v5p-128 is 64 chips on 16 hosts; v5e (`v5litepod-16`) has 4
chips per host in multi-host slices, so 16 chips on 4 hosts. HBM: v5p 95 GiB, v5e 16 GiB.
"""

from __future__ import annotations

from experiments.lib.spec import Scale

# Two (shared) CPU cores, a few minutes per run: context 256 with a 16-key window, so that a
# window and 4x it both sit well inside the context (the release: 128 keys against 32K).
TINY = Scale(
    name="tiny", accelerator="cpu", chips=1, hosts=1, mesh="", batch_size=8, seq_len=256,
    steps=80, window=16,
    train={"warmup_steps": 10, "val_every": 1000, "save_every": 40, "console_every": 20,
           "data.val_batches": 4, "lr": 3e-3, "end_lr": 3e-4},
)

# A ~1.5B-total MoE with the release's attention geometry (192/128 head dims, partial RoPE,
# sinks on sliding layers), the size of a first real ablation on TPU.
SMALL_TPU_MODEL = {
    "model_preset": "flash",
    "model.hidden_size": 1024,
    "model.num_layers": 12,
    "model.intermediate_size": 4096,
    "model.moe_intermediate_size": 512,
    "model.num_experts": 32,
    "model.num_experts_per_tok": 4,
    "model.full_attention": {"num_heads": 16, "num_kv_heads": 2},
    "model.sliding_attention": {"num_heads": 16, "num_kv_heads": 4},
    "model.max_position_embeddings": 32768,
    "compute_dtype": "bfloat16",
    "remat": "full",
    "lr": 1e-3,
    "end_lr": 1e-4,
    "warmup_steps": 200,
    "decay_steps": 2000,
    "val_every": 500,
    "save_every": 250,
    "progress_bar": False,
    "log_every": 10,
}

V5P_8 = Scale(
    name="v5p-8", accelerator="v5p", chips=4, hosts=1, mesh="fsdp=-1", batch_size=64,
    seq_len=8192, steps=10_000, window=128, train=SMALL_TPU_MODEL,
    accelerator_type="v5p-8", runtime_version="v2-alpha-tpuv5",
)
V5E_16 = Scale(
    name="v5e-16", accelerator="v5e", chips=16, hosts=4, mesh="data=4,fsdp=4", batch_size=64,
    seq_len=4096, steps=10_000, window=128, train=SMALL_TPU_MODEL,
    accelerator_type="v5litepod-16", runtime_version="v2-alpha-tpuv5-lite",
)
V5P_128 = Scale(
    name="v5p-128", accelerator="v5p", chips=64, hosts=16, mesh="data=4,fsdp=16",
    batch_size=512, seq_len=8192, steps=20_000, window=128, train=SMALL_TPU_MODEL,
    accelerator_type="v5p-128", runtime_version="v2-alpha-tpuv5",
)

STANDARD = (TINY, V5P_8, V5E_16, V5P_128)
