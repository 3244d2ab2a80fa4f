"""``attnkit.opspec``: options as a literal spec plus tensors, rebuilt equal."""

from __future__ import annotations

import ast
import math
import subprocess
import sys

import torch

from attnkit import Aux, masks, positional, scores
from attnkit.opspec import flatten, tensors_of, unflatten


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < 8)


def test_a_composed_mask_rebuilds_to_the_same_pattern() -> None:
    window = masks.causal() & masks.sliding_window(7)
    mask = window | ~masks.sinks(4) | masks.dilated_window(6, dilation=2)
    spec, tensors = flatten(mask)
    assert tensors == []
    rebuilt = unflatten(spec, tensors)
    assert rebuilt is not mask and type(rebuilt) is type(mask)
    assert torch.equal(rebuilt.dense(40, 50), mask.dense(40, 50))
    assert rebuilt.identity == mask.identity


def test_the_spec_is_a_literal_naming_classes_by_import_path() -> None:
    spec, _ = flatten({"mask": masks.causal(), "score": scores.sigmoid(), "aux": Aux(lse=True)})
    ast.literal_eval(spec)
    assert "attnkit.masks.patterns:Band" in spec and "attnkit.scores:Sigmoid" in spec
    assert "0x" not in spec  # no object addresses


def test_tensors_leave_the_spec_and_come_back_in_order() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    bias = positional.relative_bias(2, 3)
    options = {"mask": masks.documents(seg) & masks.causal(), "bias": bias}
    spec, tensors = flatten(options)
    assert [t is u for t, u in zip(tensors, tensors_of(options), strict=True)] == [True] * 3
    assert tensors[-1] is bias.table
    other = [t.clone() for t in tensors]
    rebuilt = unflatten(spec, other)
    assert rebuilt["bias"].table is other[-1]
    assert torch.equal(rebuilt["mask"].dense(6, 6), options["mask"].dense(6, 6))
    # the same options with other tensor values share one spec
    seg2 = torch.tensor([[0, 1, 1, 1, 2, 2]])
    assert flatten({"mask": masks.documents(seg2) & masks.causal(), "bias": bias})[0] == spec


def test_caches_are_not_carried() -> None:
    used = masks.sliding_window(5)
    used.blocks(64, 64)
    assert "_derived" in vars(used)
    assert flatten(used)[0] == flatten(masks.sliding_window(5))[0]


def test_functions_by_path_or_from_this_process() -> None:
    by_path = masks.from_mask_mod(prefix_lm)
    spec, _ = flatten(by_path)
    assert f"{__name__}:prefix_lm" in spec
    assert unflatten(spec, []).fn is prefix_lm

    def local(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    spec, _ = flatten(masks.from_mask_mod(local))
    assert "'local'" in spec
    assert unflatten(spec, []).fn is local
    assert flatten(masks.from_mask_mod(local))[0] == spec  # one entry per object


def test_scalars_and_containers_round_trip() -> None:
    value = {
        "numbers": (1, -2.5, math.inf, -math.inf, True, None, "text"),
        "list": [torch.float16, torch.device("cpu"), slice(-32, None)],
        "score": scores.softcap(30.0),
    }
    rebuilt = unflatten(*flatten(value))
    assert rebuilt == value
    nan = unflatten(*flatten(math.nan))
    assert math.isnan(nan)


def test_a_spec_is_valid_in_a_new_process() -> None:
    spec, _ = flatten({"mask": masks.sliding_window(3) | masks.sinks(1), "aux": Aux(lse=True)})
    script = (
        "import sys, torch; from attnkit.opspec import unflatten; "
        "o = unflatten(sys.argv[1], []); "
        "print(o['mask'].dense(5, 5).sum().item(), o['aux'].lse)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, spec], capture_output=True, text=True, check=True
    )
    expected = (masks.sliding_window(3) | masks.sinks(1)).dense(5, 5).sum().item()
    assert result.stdout.split() == [str(expected), "True"]
