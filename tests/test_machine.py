"""Capability detection: the CPU features in force, forced-down ISAs included."""

from __future__ import annotations

import pytest
import torch

from attnkit import machine
from attnkit.backends import native

ZEN5 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512vl", "sse4_2"})
EPYC_AVX2 = frozenset({"avx2", "fma", "sse4_2"})


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(flags, isa, onednn=None)``: the capabilities detected on such a CPU."""

    def detect(flags: frozenset[str], isa: str, onednn: str | None = None) -> machine.Capabilities:
        monkeypatch.setattr(machine, "_cpuinfo_flags", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
        if onednn is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
        machine._capabilities.cache_clear()
        return machine.capabilities("cpu")

    yield detect
    machine._capabilities.cache_clear()


def test_an_avx512_bf16_cpu_has_native_bfloat16(cpu) -> None:
    caps = cpu(ZEN5, "AVX512")
    assert caps.native_bfloat16 and caps.missing_bfloat16() == ""
    assert {"avx512f", "avx512_bf16"} <= caps.flags and "sse4_2" not in caps.flags
    assert caps.forced == ()


def test_an_avx2_cpu_emulates_bfloat16_and_says_so(cpu) -> None:
    caps = cpu(EPYC_AVX2, "AVX2")
    assert not caps.native_bfloat16
    assert "no AVX512-BF16" in caps.missing_bfloat16() and "emulated" in caps.missing_bfloat16()
    assert caps.flags == {"avx2", "fma"} and caps.forced == ()


def test_forcing_the_capability_down_hides_the_features_above_it(cpu) -> None:
    aten = cpu(ZEN5, "AVX2")
    assert aten.flags == {"avx2", "fma"} and not aten.native_bfloat16
    assert aten.forced and aten.forced[0].startswith("ATEN_CPU_CAPABILITY")
    assert "ATEN_CPU_CAPABILITY" in aten.missing_bfloat16()
    onednn = cpu(ZEN5, "AVX512", onednn="AVX2")
    assert onednn.flags == {"avx2", "fma"} and not onednn.native_bfloat16
    assert onednn.forced == ("ONEDNN_MAX_CPU_ISA=AVX2",)
    core = cpu(ZEN5, "AVX512", onednn="avx512_core")  # AVX-512 without its bf16 dot products
    assert "avx512f" in core.flags and not core.native_bfloat16


def test_cuda_capability_decides_bfloat16() -> None:
    ampere = machine.Capabilities("cuda", "a GPU", "sm_80", frozenset(), (), (8, 0))
    turing = machine.Capabilities("cuda", "a GPU", "sm_75", frozenset(), (), (7, 5))
    blackwell = machine.Capabilities("cuda", "a GPU", "sm_100", frozenset(), (), (10, 0))
    assert ampere.native_bfloat16 and blackwell.native_bfloat16
    assert not turing.native_bfloat16 and "sm_75" in turing.missing_bfloat16()


def test_the_kernels_are_built_for_the_capability_in_force() -> None:
    """Under ATEN_CPU_CAPABILITY=avx2 (scripts/test_avx2.sh) the AVX2 build runs, and its
    bfloat16 GEMM is not the AVX512-BF16 brgemm."""
    kernel = native.load("blocksparse_cpu")
    if kernel is None:
        pytest.skip(f"no compiled kernel here: {native.unavailable('blocksparse_cpu')}")
    capability = torch.backends.cpu.get_cpu_capability()
    assert kernel.__name__.endswith(capability.lower())
    if not machine.capabilities("cpu").native_bfloat16:
        assert kernel.bfloat16_gemm() != "brgemm"
