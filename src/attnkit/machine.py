"""What the machine that runs attnkit can do: its CPU's vector features as they are in force for
this process, and its CUDA devices.

A feature counts only where the code that would use it may: an AVX-512 CPU whose process runs
with ``ATEN_CPU_CAPABILITY=avx2`` (ATen's and inductor's vector code) or
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's matmuls) behaves as an AVX2 CPU, and is described as one.
That is how tests run the lower ISA path on any machine.

The facts that decide what runs fast:

- ``avx512_bf16`` / ``amx_bf16``: bfloat16 dot products in hardware. Without either, oneDNN and
  ATen convert bfloat16 matmuls to float32 on the fly (emulation), many times slower than a
  float32 matmul; attnkit then does not choose its bfloat16 matmul paths.
- ``avx512f``: 512-bit vectors (attnkit's kernels are built for the capability in force).
- CUDA: the device name and compute capability, which select SDPA's and Flex's GPU kernels.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

#: CPU flags (as ``/proc/cpuinfo`` names them) that attnkit's choices depend on.
TRACKED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile")
#: Flags that need ATen's AVX-512 capability to be used by ATen, inductor and attnkit's kernels.
_NEEDS_AVX512 = frozenset({"avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"})
#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) and the flags each allows oneDNN to use.
_ONEDNN_CAPS = {
    "SSE41": frozenset(),
    "AVX": frozenset(),
    "AVX2": frozenset({"avx2", "fma"}),
    "AVX2_VNNI": frozenset({"avx2", "fma"}),
    "AVX2_VNNI_2": frozenset({"avx2", "fma"}),
    "AVX512_CORE": frozenset({"avx2", "fma", "avx512f", "avx512bw"}),
    "AVX512_CORE_VNNI": frozenset({"avx2", "fma", "avx512f", "avx512bw"}),
    "AVX512_CORE_BF16": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}),
}


def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Capabilities:
    """One device as attnkit sees it.

    ``device`` is ``"cpu"`` or ``"cuda"``; ``name`` the CPU model or GPU name; ``isa`` ATen's CPU
    capability in force (``AVX512``, ``AVX2``, ``DEFAULT``, ...; for CUDA ``sm_XY``); ``flags``
    the tracked CPU features this process may use (``TRACKED_FLAGS``, less what
    ``ATEN_CPU_CAPABILITY`` or ``ONEDNN_MAX_CPU_ISA`` rule out); ``forced`` the settings that
    lowered them.
    """

    device: str
    name: str
    isa: str
    flags: frozenset[str]
    forced: tuple[str, ...] = ()
    cuda_capability: tuple[int, int] | None = None

    @property
    def native_bfloat16(self) -> bool:
        """True where bfloat16 matmuls run on bfloat16 hardware (CUDA from sm_80; CPUs with
        AVX512-BF16 or AMX-BF16), not emulated through float32."""
        if self.cuda_capability is not None:
            return self.cuda_capability >= (8, 0)
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    def missing_bfloat16(self) -> str:
        """Why bfloat16 matmuls are emulated here (empty where they are not)."""
        if self.native_bfloat16:
            return ""
        if self.device == "cuda":
            return f"this GPU ({self.isa}) has no bfloat16 tensor cores"
        forced = f" in force here ({', '.join(self.forced)})" if self.forced else ""
        return (
            f"this CPU has no AVX512-BF16 or AMX-BF16{forced}; bfloat16 matmuls are emulated "
            "through float32, many times slower"
        )

    def describe(self) -> str:
        """One line: the device, its ISA and the flags in force."""
        flags = " ".join(sorted(self.flags)) or "none"
        forced = f"; forced by {', '.join(self.forced)}" if self.forced else ""
        return f"{self.device}: {self.name}; {self.isa}; flags {flags}{forced}"


def _cpu() -> Capabilities:
    isa = torch.backends.cpu.get_cpu_capability()
    flags = _cpuinfo_flags() & frozenset(TRACKED_FLAGS)
    forced: list[str] = []
    if isa != "AVX512":
        if flags & _NEEDS_AVX512:
            forced.append(f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', isa)}")
        flags -= _NEEDS_AVX512
        if isa not in ("AVX2",):
            flags -= {"avx2", "fma"}
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in _ONEDNN_CAPS:
        if _cpuinfo_flags() & frozenset(TRACKED_FLAGS) - _ONEDNN_CAPS[cap]:
            forced.append(f"ONEDNN_MAX_CPU_ISA={cap}")
        flags &= _ONEDNN_CAPS[cap]
    return Capabilities("cpu", _cpu_model(), isa, flags, tuple(forced))


def _cuda(index: int) -> Capabilities:
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    return Capabilities("cuda", name, f"sm_{major}{minor}", frozenset(), (), (major, minor))


@functools.cache
def _capabilities(device_type: str, index: int) -> Capabilities:
    return _cuda(index) if device_type == "cuda" else _cpu()


def capabilities(device: torch.device | str = "cpu") -> Capabilities:
    """The capabilities of ``device`` in this process (cached)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _capabilities("cuda", device.index or 0)
    return _capabilities(device.type, 0)


def cpu_flags_line() -> str:
    """The CPU's AVX-512 flags as ``/proc/cpuinfo`` lists them (what benchmark reports print),
    and the capability in force."""
    avx512 = sorted(flag for flag in _cpuinfo_flags() if flag.startswith("avx512"))
    cpu = capabilities("cpu")
    return f"{cpu.name}; AVX-512 flags: {' '.join(avx512) or 'none'}; in force: {cpu.isa}" + (
        f" ({', '.join(cpu.forced)})" if cpu.forced else ""
    )
