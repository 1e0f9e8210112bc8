"""What the CPU can do fast: the instruction sets that decide whether INT8 inference beats fp32.

INT8 convolutions are about twice as fast as fp32 only where the CPU accumulates u8 x s8 products into int32 in one
instruction: AVX512_VNNI (Intel since Cascade Lake, AMD since Zen 4), AVX_VNNI (Alder Lake and later client cores) or
AMX (Sapphire Rapids and later). With AVX2 alone they run at the fp32 speed (docs/PERFORMANCE.md), so
`Predictor(backend="auto")` keeps fp32 there.

bf16 autocast trains about twice as fast as fp32 only where the CPU computes bfloat16 natively (AVX512_BF16, AMX);
elsewhere it is emulated and far slower (docs/TRAINING.md), so `tools/train_default.sh` asks `bf16_instructions`.
"""

from __future__ import annotations

import pathlib

# /proc/cpuinfo names, in the order they are reported as the reason
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = pathlib.Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags of the first processor in /proc/cpuinfo, or of `cpuinfo` (that file's text) when
    given; empty where there is no such file (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def int8_instructions(flags: frozenset[str] | None = None) -> str | None:
    """The flag that makes INT8 faster than fp32 on this CPU (of `flags` when given), or None where there is none."""
    return _first_of(INT8_FLAGS, flags)


def bf16_instructions(flags: frozenset[str] | None = None) -> str | None:
    """The flag that makes bf16 autocast faster than fp32 on this CPU (of `flags` when given), or None."""
    return _first_of(BF16_FLAGS, flags)


def _first_of(wanted: tuple[str, ...], flags: frozenset[str] | None) -> str | None:
    flags = cpu_flags() if flags is None else flags
    return next((f for f in wanted if f in flags), None)
