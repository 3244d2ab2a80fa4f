"""Mutation check: break the core on purpose and see that the tests notice.

Not part of CI. Each mutation replaces one exact piece of source text (which must occur exactly
once), runs a small pytest selection (``-x -q``, with a timeout), records whether it failed
(the mutation is *caught*) and the first failing test, and restores the file, also on Ctrl-C.

    .venv/bin/python scripts/mutate.py            # baseline, then every mutation: a few minutes
    .venv/bin/python scripts/mutate.py --list     # check every old text occurs exactly once
    .venv/bin/python scripts/mutate.py --only causal_strict,gqa_tiled

Prints ``mutation | caught | first failing test`` and exits non-zero if a mutation survived,
timed out or its selection collected nothing (or the unmutated baseline fails). Run it on an
idle machine: it edits files of the working tree while it runs (each restored as soon as its
selection finishes), and waits while ``/tmp/attnkit_bench.lock`` exists before each run.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_LOCK = Path("/tmp/attnkit_bench.lock")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact text, occurring once in the file
    new: str
    description: str
    selection: tuple[str, ...]  # pytest node ids or test files (no -k: one baseline run)


def _catalog(*cases: str) -> tuple[str, ...]:
    """Node ids of ``test_mechanism_matches_reference[name-shape]`` in tests/test_catalog.py."""
    return tuple(f"tests/test_catalog.py::test_mechanism_matches_reference[{c}]" for c in cases)


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "causal_strict",
        "src/attnkit/masks/patterns.py",
        '    return Band(None, 0, "causal")',
        '    return Band(None, -1, "causal")',
        "causal mask q >= k becomes q > k (a query no longer sees its own key)",
        _catalog("causal-self", "causal-cross"),
    ),
    Mutation(
        "causal_leaks_one",
        "src/attnkit/masks/patterns.py",
        '    return Band(None, 0, "causal")',
        '    return Band(None, 1, "causal")',
        "causal mask lets each query see the next key (layers read the future)",
        ("tests/test_catalog.py::test_layer_mechanism_reads_only_the_tokens_it_may",),
    ),
    Mutation(
        "window_off_by_one",
        "src/attnkit/masks/patterns.py",
        '    return Band(-int(left), int(right), f"sliding_window({left}, {right})")',
        '    return Band(-int(left) + 1, int(right), f"sliding_window({left}, {right})")',
        "sliding_window(left) sees left keys back instead of left + 1 (one key short)",
        _catalog("sliding_window-long", "sinks_window-long"),
    ),
    Mutation(
        "window_predicate_off_by_one",
        "src/attnkit/masks/patterns.py",
        "        allowed = allowed & (d >= lower)\n",
        "        allowed = allowed & (d >= lower + 1)\n",
        "band predicate drops the oldest key of every window (tile rule unchanged)",
        _catalog("sliding_window-long", "dilated_window-long"),
    ),
    Mutation(
        "sinks_one_more",
        "src/attnkit/masks/patterns.py",
        "        return (k < self._count(b)) & (q >= 0)",
        "        return (k <= self._count(b)) & (q >= 0)",
        "sinks(n) / key padding keep n + 1 keys",
        _catalog("sinks_window-long", "key_padding-self"),
    ),
    Mutation(
        "documents_leak",
        "src/attnkit/masks/patterns.py",
        "        return self.q_segments[b, q] == self.kv_segments[b, k]",
        "        return self.q_segments[b, q] >= self.kv_segments[b, k]",
        "packed documents see every earlier document",
        _catalog("documents-self", "documents-long"),
    ),
    Mutation(
        "alignment_top_left",
        "src/attnkit/masks/base.py",
        "    return q_idx + (Tk - Tq)",
        "    return q_idx",
        "queries aligned top-left: with Tq < Tk causal masks lose the offset Tk - Tq",
        _catalog("causal-cross", "sliding_window-long_cross"),
    ),
    Mutation(
        "no_softmax_scale",
        "src/attnkit/call.py",
        "            self.scale = 1.0 / math.sqrt(self.D)",
        "            self.scale = 1.0",
        "the default score scale 1/sqrt(D) is dropped",
        _catalog("softmax-self", "causal-self"),
    ),
    Mutation(
        "gqa_tiled",
        "src/attnkit/primitives.py",
        "    return x.repeat_interleave(groups, dim=dim)",
        "    return torch.cat([x] * groups, dim=dim)",
        "GQA grouping dropped: query head h reads KV head h % Hkv instead of h // groups",
        _catalog("causal-self", "softmax-cross"),
    ),
    Mutation(
        "lse_merge_sign",
        "src/attnkit/merge.py",
        "    w_b = torch.exp(lse_b - ref).unsqueeze(-1)",
        "    w_b = torch.exp(ref - lse_b).unsqueeze(-1)",
        "LSE merge weighs the second piece by exp(lse - lse_b) (sign flipped)",
        ("tests/test_merge.py",),
    ),
    Mutation(
        "cog_merge_sign",
        "src/attnkit/api.py",
        "    out, lse = merge(pos.to(acc), lse_pos, -neg.to(acc), lse_neg)",
        "    out, lse = merge(pos.to(acc), lse_pos, neg.to(acc), lse_neg)",
        "Cog's negative half merged without its sign flip (all weights positive)",
        _catalog("cog-self", "cog-long"),
    ),
    Mutation(
        "sigmoid_bias_sign",
        "src/attnkit/scores.py",
        "        return -math.log(max(Tk, 1)) if self.bias is None else float(self.bias)",
        "        return math.log(max(Tk, 1)) if self.bias is None else float(self.bias)",
        "sigmoid attention's default bias +log(n) instead of -log(n)",
        _catalog("sigmoid-self"),
    ),
    Mutation(
        "softcap_unscaled",
        "src/attnkit/scores.py",
        "        return self.softcap * torch.tanh(s / self.softcap)",
        "        return torch.tanh(s / self.softcap)",
        "soft cap returns tanh(s / cap) without the factor cap",
        _catalog("softcap-self"),
    ),
    Mutation(
        "alibi_slopes_reversed",
        "src/attnkit/positional/alibi.py",
        "        return [start ** (i + 1) for i in range(n)]",
        "        return [start ** (n - i) for i in range(n)]",
        "ALiBi slopes assigned to the heads in reverse order",
        _catalog("alibi-self"),
    ),
    Mutation(
        "relative_bias_offset_sign",
        "src/attnkit/positional/learned.py",
        "        offset = (k_pos - q_pos).clamp(-self.max_distance, self.max_distance)"
        " + self.max_distance\n        return self.table[h, offset]",
        "        offset = (q_pos - k_pos).clamp(-self.max_distance, self.max_distance)"
        " + self.max_distance\n        return self.table[h, offset]",
        "learned relative bias reads offset i - j instead of j - i",
        _catalog("relative_bias-self"),
    ),
    Mutation(
        "neighborhood_no_inward_shift",
        "src/attnkit/masks/neighborhood.py",
        "        start = torch.minimum(torch.clamp(leader - k // 2, min=0), n - k)",
        "        start = torch.clamp(leader - k // 2, min=0)",
        "neighborhood windows not shifted inward at the end of an axis",
        _catalog("neighborhood_1d-long", "neighborhood_2d-long"),
    ),
    Mutation(
        "moa_span_off_by_one",
        "src/attnkit/masks/heads.py",
        "        return (d <= 0) & (d > -span)",
        "        return (d <= 0) & (d >= -span)",
        "per-head windows (MoA) see span + 1 keys",
        _catalog("moa_windows-long"),
    ),
    Mutation(
        "gla_recurrent_drops_gate",
        "src/attnkit/linear/chunked.py",
        "            S = torch.exp(g[:, t]).unsqueeze(-1) * S\n",
        "            S = S\n",
        "the recurrent form of the linear core ignores the gates (no decay)",
        ("tests/linear/test_gla.py::test_every_form_matches_the_recurrence",),
    ),
    Mutation(
        "gla_chunked_drops_gate_across_chunks",
        "src/attnkit/linear/chunked.py",
        "    q_from_start = qc if b is None else qc * torch.exp(b).unsqueeze(3)",
        "    q_from_start = qc",
        "the chunked form reads the carried state without the decay inside the chunk",
        ("tests/linear/test_gla.py::test_every_form_matches_the_recurrence",),
    ),
    Mutation(
        "gla_default_scale",
        "src/attnkit/linear/gla.py",
        "    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale",
        "    scale = 1.0 if scale is None else scale",
        "GLA's default scale 1/sqrt(Dk) dropped (every form alike)",
        ("tests/linear/test_gla.py::test_every_form_matches_the_recurrence",),
    ),
    Mutation(
        "auto_ranks_slowest_first",
        "src/attnkit/dispatch.py",
        "key=lambda item: item[1][0])",
        "key=lambda item: -item[1][0])",
        "auto ranks the backends by descending estimated cost",
        ("tests/test_api.py::test_explain_names_the_choice_and_a_reason_for_every_other_backend",),
    ),
    Mutation(
        "injected_costs_ignored",
        "src/attnkit/calibration.py",
        "    if given is not None:\n        return given\n",
        "    if False:\n        return given\n",
        "calibration.using(table) has no effect (auto ranks by this machine's table)",
        ("tests/test_dispatch.py::test_ranking_follows_the_table",),
    ),
    Mutation(
        "cache_positions_restart",
        "src/attnkit/nn/attention.py",
        "            positions = torch.arange(past, past + T, device=x.device)",
        "            positions = torch.arange(0, T, device=x.device)",
        "decoding with a cache restarts positions at 0 (RoPE of new tokens wrong)",
        ("tests/test_catalog.py::test_causal_layer_decodes_with_a_cache_as_its_full_forward",),
    ),
    Mutation(
        "bench_ratio_inverted",
        "src/attnkit/bench/speed.py",
        "            r.ratio = paired_ratio(baseline.times_ms, r.times_ms)",
        "            r.ratio = paired_ratio(r.times_ms, baseline.times_ms)",
        "the bench's ratio is candidate time / baseline time",
        ("tests/test_cli.py::test_bench_quick_writes_report",),
    ),
    Mutation(
        "compiled_backward_drops_lse_gradient",
        "src/attnkit/opaque.py",
        "            if grad.numel() and out.requires_grad",
        "            if grad.numel() and out.requires_grad and out.dim() == 4",
        "the compiled backward ignores the gradient of a differentiated lse output",
        ("tests/test_compile.py",),
    ),
    Mutation(
        "compiled_forward_without_grad_mode",
        "src/attnkit/opaque.py",
        "    grad = any(t.requires_grad for t in inputs)",
        "    grad = False",
        "the op's forward runs without autograd, so forms chosen for inference run in training",
        ("tests/test_compile.py",),
    ),
    Mutation(
        "compiled_backward_forgets_the_graph",
        "src/attnkit/opaque.py",
        "    graph = _GRAPHS.pop(int(handle), None)",
        "    graph = _GRAPHS.pop(int(handle), None) and None",
        "the compiled backward recomputes the forward instead of using the graph it recorded",
        ("tests/test_opaque.py",),
    ),
    Mutation(
        "kernel_sigmoid_gradient_as_softmax",
        "src/attnkit/backends/csrc/blocksparse_cpu.cpp",
        "      dw = p * (one - w);",
        "      dw = p * one;",
        "the kernel's sigmoid backward drops the (1 - w) of sigmoid's derivative",
        ("tests/backends/test_blocksparse_scores.py",),
    ),
    Mutation(
        "kernel_offset_bias_gradient_sign",
        "src/attnkit/backends/csrc/blocksparse_cpu.cpp",
        "ds, n, 1.0f / score.scale);",
        "ds, n, -1.0f / score.scale);",
        "the kernel's gradient of an offset bias (ALiBi slopes, KERPLE, tables) has the wrong sign",
        ("tests/backends/test_blocksparse_scores.py",),
    ),
    Mutation(
        "kernel_offset_bias_aligned_top_left",
        "src/attnkit/backends/csrc/blocksparse_cpu.cpp",
        "    return h * bias_len + key0 - i + Tq - 1;",
        "    return h * bias_len + key0 - i + bias_len - Tq;",
        "the kernel's offset bias ignores the bottom-right alignment of queries",
        ("tests/backends/test_blocksparse_scores.py",),
    ),
    Mutation(
        "spec_numbers_become_symbols",
        "src/attnkit/opspec.py",
        '        return ("value", _static(obj))',
        '        return ("value", obj)',
        "numbers read from a compiled function's arguments are no longer made constants",
        ("tests/test_compile.py::test_changed_options_compile_anew",),
    ),
    Mutation(
        "spec_carries_caches",
        "src/attnkit/opspec.py",
        '        if not name.startswith("_")',
        "        if True",
        "a mask's cached tile structures are flattened into the spec",
        ("tests/test_opspec.py",),
    ),
    Mutation(
        "score_mod_bias_not_checked_additive",
        "src/attnkit/positional/score_mod.py",
        "    if not torch.allclose(added, term,",
        "    if False and not torch.allclose(added, term,",
        "positional.from_score_mod accepts a score_mod that transforms the score",
        ("tests/positional/test_score_mod.py",),
    ),
)


# -- applying and restoring -----------------------------------------------------------------


def _check(m: Mutation) -> str | None:
    """Why ``m`` cannot be applied to the current tree, or None."""
    path = ROOT / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    count = path.read_text().count(m.old)
    if count != 1:
        return f"old text occurs {count} times in {m.file} (needs exactly 1)"
    if m.old == m.new:
        return "old and new text are the same"
    for arg in m.selection:
        test_file = arg.split("::")[0]
        if not test_file.startswith("tests/") or not (ROOT / test_file).is_file():
            return f"selection {arg!r} names no test file of tests/"
    return None


class Applied:
    """``with Applied(m):`` the file holds the mutation; on exit (also on Ctrl-C) the mutated
    text is replaced back, leaving anything else edited meanwhile in place (others may work in
    the same checkout: the whole file is never written back over their edits)."""

    def __init__(self, m: Mutation):
        self.m, self.path = m, ROOT / m.file

    def __enter__(self) -> Applied:
        original = self.path.read_text()
        if original.count(self.m.old) != 1:
            raise RuntimeError(f"{self.m.name}: old text no longer occurs exactly once")
        self.path.write_text(original.replace(self.m.old, self.m.new))
        return self

    def __exit__(self, *exc: object) -> None:
        current = self.path.read_text()
        if current.count(self.m.new) == 1:
            self.path.write_text(current.replace(self.m.new, self.m.old))
        elif self.m.new not in current:
            print(f"warning: {self.m.file} was rewritten during the run, without the mutation")
        else:
            raise RuntimeError(
                f"{self.m.file}: the mutated text now occurs {current.count(self.m.new)} times; "
                f"restore by hand: replace {self.m.new!r} with {self.m.old!r}"
            )


# -- running pytest -------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # caught, survived, timeout, no tests, error
    first_failure: str = ""


def _wait_for_bench() -> None:
    while BENCH_LOCK.exists():
        print(f"  waiting: {BENCH_LOCK} exists (a benchmark is running)")
        time.sleep(20)


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_selection(selection: tuple[str, ...], timeout: float, stop_first: bool = True) -> Outcome:
    _wait_for_bench()
    # No bytecode is written: a mutated module's .pyc must never outlive the mutation.
    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1", "ATTNKIT_CALIBRATION": "off"}
    args = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    args += ["-x"] * stop_first + list(selection)
    try:
        done = subprocess.run(
            args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Outcome("timeout")
    output = done.stdout + done.stderr
    found = _FAILED.search(output)
    first = found[2] if found else ""
    if done.returncode == 0:
        return Outcome("survived")
    if done.returncode == 1:
        return Outcome("caught", first)
    if done.returncode == 5:
        return Outcome("no tests")
    # 2 (interrupted: e.g. a collection error the mutation caused), 3, 4: the selection could
    # not run as written; shown with pytest's last line so it can be judged.
    last = output.strip().splitlines()[-1] if output.strip() else ""
    return Outcome("error", first or f"pytest exit {done.returncode}: {last[:80]}")


# -- the command ----------------------------------------------------------------------------


def _table(rows: list[tuple[str, str, str]]) -> str:
    header = ("mutation", "caught", "first failing test")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    head = " | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))
    return "\n".join([head, "-+-".join("-" * w for w in widths), *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="check the table; run nothing")
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per selection")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip running the selections unmutated first"
    )
    options = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        print("mutation names must be unique")
        return 2
    chosen = list(MUTATIONS)
    if options.only:
        wanted = options.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"unknown mutations: {', '.join(unknown)}; known: {', '.join(names)}")
            return 2
        chosen = [m for m in MUTATIONS if m.name in wanted]

    problems = {m.name: why for m in chosen if (why := _check(m)) is not None}
    if options.list:
        for m in chosen:
            state = f"BROKEN: {problems[m.name]}" if m.name in problems else "ok"
            print(f"{m.name:38} {state}\n    {m.file}: {m.description}")
            print(f"    pytest {' '.join(m.selection)}")
        print(f"\n{len(chosen) - len(problems)} of {len(chosen)} mutations apply to this tree")
        return 1 if problems else 0
    if problems:
        for name, why in problems.items():
            print(f"{name}: {why}")
        return 2

    # Ctrl-C and SIGTERM both unwind through Applied.__exit__, which restores the file.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    if not options.no_baseline:
        # Every selection passes unmutated, else a failure would not mean "caught".
        everything = tuple(dict.fromkeys(a for m in chosen for a in m.selection))
        print("baseline: the selections on the unmutated tree ...", flush=True)
        base = run_selection(everything, options.timeout * 2, stop_first=False)
        if base.status != "survived":
            print(f"the baseline does not pass ({base.status} {base.first_failure}); fix it first")
            return 2

    rows: list[tuple[str, str, str]] = []
    bad = 0
    try:
        for i, m in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {m.name}: {m.description}", flush=True)
            with Applied(m):
                outcome = run_selection(m.selection, options.timeout)
            caught = outcome.status == "caught"
            bad += not caught
            label = "yes" if caught else f"NO ({outcome.status})"
            rows.append((m.name, label, outcome.first_failure or "—"))
    except KeyboardInterrupt:
        print("\ninterrupted; the mutated file was restored")
        return 130
    finally:
        unrestored = [m.file for m in chosen if (ROOT / m.file).read_text().count(m.old) != 1]
        if unrestored:
            print(f"check these files by hand (git diff): {', '.join(sorted(set(unrestored)))}")
    print()
    print(_table(rows))
    print(f"\n{len(rows) - bad} of {len(rows)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
