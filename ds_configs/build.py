"""Write the DeepSpeed JSON configs from one table, so what they share is written once.

    python ds_configs/build.py        # rewrites ds_configs/*.json

tests/test_launcher.py checks that the committed files equal this output.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# "auto" values are filled by Accelerate from the recipe: micro batch, accumulation, clipping
# (training.max_grad_norm) and precision (training.mixed_precision).
COMMON = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}
# stage3_param_persistence_threshold (elements), DeepSpeed 0.19's default; see "zero3".
PERSISTENCE_THRESHOLD = 100_000
CPU_OFFLOAD = {"device": "cpu", "pin_memory": False}
ZERO = {
    "zero1": {"stage": 1},
    "zero2": {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_scatter": True,
    },
    "zero3": {
        "stage": 3,
        "overlap_comm": False,
        "stage3_gather_16bit_weights_on_model_save": True,
        # Bucket sizes scaled to the model: Accelerate fills "auto" with hidden_size**2
        # (reduce) and 0.9 * hidden_size**2 (prefetch). DeepSpeed's fixed defaults (5e8 and
        # 5e7 elements) exceed a small or mid-sized model, so buffers of that size erase most
        # of ZeRO-3's per-rank saving (bench/zero_bench.py: 0.15 of the predicted saving with
        # the defaults, 0.63 with these).
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        # DeepSpeed's own default, written out because it decides what ZeRO-3 does NOT shard:
        # parameters of at most this many elements (norms, biases, small layers) are held
        # whole on every rank while training.
        "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
    },
}
ZERO["zero2_offload"] = {**ZERO["zero2"], "offload_optimizer": CPU_OFFLOAD}
ZERO["zero3_offload"] = {
    **ZERO["zero3"],
    "offload_optimizer": CPU_OFFLOAD,
    "offload_param": CPU_OFFLOAD,
}


def render(name: str) -> str:
    return json.dumps({**COMMON, "zero_optimization": ZERO[name]}, indent=2) + "\n"


def main() -> None:
    for name in ZERO:
        (HERE / f"{name}.json").write_text(render(name), encoding="utf-8")


if __name__ == "__main__":
    main()
