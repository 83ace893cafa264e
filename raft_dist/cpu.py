"""CPU facts that change how a run behaves: is this rank on the CPU, is bf16 native here."""

from __future__ import annotations

from typing import Any

from raft_dist.env import env_flag


def on_cpu() -> bool:
    import torch

    return env_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def cpu_has_native_bf16(unknown: bool = True) -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 autocast is emulated and ~10x slower.
    `unknown` is the answer where /proc/cpuinfo does not exist (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return unknown
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_warnings(live: Any) -> list[str]:
    """Settings that work on this CPU but not the way the user expects."""
    warnings = []
    if live.device_type == "cpu" and live.mixed_precision == "bf16" and not cpu_has_native_bf16():
        warnings.append(
            "mixed precision bf16 on a CPU without AVX512-BF16/AMX is emulated and runs about "
            "10x slower than fp32 here; consider training.mixed_precision=no"
        )
    return warnings
