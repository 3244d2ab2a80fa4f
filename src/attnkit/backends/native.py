"""attnkit's compiled CPU kernels, built on first use with ``torch.utils.cpp_extension``.

The kernels are C++ sources shipped in ``attnkit/backends/csrc``; the first call compiles them
for this machine's vector unit (once per machine and source, cached by PyTorch under
``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``). Where no compiler is available, or
``ATTNKIT_NATIVE=0`` is set, :func:`load` returns ``None`` and :func:`unavailable` says why;
callers then use their pure-PyTorch path, which computes the same result.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCES = Path(__file__).parent / "csrc"

#: PyTorch's CPU capability -> the macro that selects ATen's vector code and the compiler
#: flags that let it compile.
_CAPABILITY_FLAGS: dict[str, list[str]] = {
    "AVX512": [
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
    ],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}


@functools.cache
def _build(name: str) -> tuple[ModuleType | None, str | None]:
    if os.environ.get("ATTNKIT_NATIVE", "1") == "0":
        return None, "disabled by ATTNKIT_NATIVE=0"
    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: ATen's parallel_for is a header template that runs serially without it; the
    # extension then shares the libgomp that PyTorch has already loaded.
    flags = ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY_DEFAULT"])]
    try:
        from torch.utils.cpp_extension import load as load_extension

        module = load_extension(
            name=f"attnkit_{name}_{capability.lower()}",
            sources=[str(_SOURCES / f"{name}.cpp")],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler or headers: fall back, and say why
        reason = f"compiling {name}.cpp failed: {type(error).__name__}: {error}"
        warnings.warn(
            f"attnkit: {reason}; the pure-PyTorch path runs instead (same results, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    return module, None


def load(name: str) -> ModuleType | None:
    """The compiled module ``csrc/<name>.cpp``, or ``None`` when it cannot be built here."""
    return _build(name)[0]


def unavailable(name: str) -> str | None:
    """Why :func:`load` returns ``None`` for ``name`` (``None`` when it loads)."""
    return _build(name)[1]
