"""What this machine is, as a report names it: the CPU's model and whether it has bf16 units."""

from __future__ import annotations

import platform
from pathlib import Path


def cpuinfo() -> list[str]:
    return Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []


def machine() -> str:
    cpu = next((x.split(":", 1)[1].strip() for x in cpuinfo() if x.startswith("model name")), None)
    return cpu or platform.processor() or "cpu"


def cpu_bf16() -> str | None:
    """The CPU's bf16 units, if any: "amx" or "avx512_bf16" (AMD EPYC Zen 4 and later, Intel Cooper Lake)."""
    flags = {f for line in cpuinfo() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return "amx" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else None)
