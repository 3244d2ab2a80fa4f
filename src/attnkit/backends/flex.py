"""FlexAttention, compiled, with BlockMasks built from the masks' analytic block structure.

``torch.nn.attention.flex_attention`` runs one fused kernel for any mask (``mask_mod``) and any
score modification (``score_mod``); the FlexAttention paper is "FlexAttention: A Programming
Model for Generating Optimized Attention Kernels" (Dong et al., 2024). attnkit feeds it:

- a ``BlockMask`` made from ``mask.blocks(Tq, Tk, 128, 128)`` (``build_block_mask``): partial
  tiles go to ``kv_indices`` (``mask_mod`` applied), full tiles to ``full_kv_indices``
  (``mask_mod`` skipped), empty tiles are never visited. FlexAttention's own
  ``create_block_mask`` evaluates all ``Tq × Tk`` pairs, which at long lengths costs more than
  the attention itself; the analytic structure costs O(tiles). The BlockMask is cached on the
  mask per sizes/device.
- a ``score_mod`` that is ``AttentionCall.log_weights`` written per pair:
  ``s (already scaled) + bias -> softcap -> log w(s)`` (any positive weight runs on a softmax
  kernel as its log-weight: ``attnkit.scores``), or ``None`` for plain softmax.

The log-normaliser on the CPU. Compiled FlexAttention on the CPU returns no log-sum-exp
(torch 2.13: "torch.compile on CPU only supports inference and `return_lse` is not supported
yet"), yet unnormalised scores (sigmoid) need it. attnkit recovers it exactly with an *anchor
key*: one extra key at index ``Tk`` whose log-weight is the constant 0 and whose value is
``[0, .., 0, 0, 1]``, while every real value gets two extra columns ``[v, 1, 0]``. The kernel
then returns ``out = [sum_j w_j v_j, Z, 1] / (Z + 1)`` with ``Z = sum_j w_j``, so
``out_norm = out[:Dv] / out[Dv]`` and ``lse = log(out[Dv]) - log(out[Dv + 1])``, both without
cancellation. This is exact while every row's largest log-weight lies within ~80 of the anchor:
always true for sigmoid (``log w <= 0``; a row whose weights are all below ``e^-87`` reports
``lse = -inf`` and out 0, off by at most ``Tk e^-87 max|v|``), for ReLU attention
(``w = relu(s) / Tk``: the same below, and above only for scores beyond ``e^80 Tk``) and for
softmax capped at ``|s| <= 80``; half-precision inputs take this path in float32 so the
division stays exact; other scores that need the lse (aux outputs) are refused on the CPU.
On other devices the kernel's own lse (``AuxRequest(lse=True)``, natural log) is used.

Limits (torch 2.13, CPU): forward only (no backward pass, compiled or not); compiled kernels
take float32/float16/bfloat16 (not float64; ``eager()`` mode runs float64); any head dim
(odd D=33 works) and a value head dim different from the query/key one. Query/key head dims
below 24 are zero-padded to 24 for the compiled CPU kernel (``_widen_small_heads``: its
``q @ k^T`` micro-GEMM is wrong there on 256-bit vectors).

Compiling costs seconds per variant (each mask, score, head dim and sequence length), less
with inductor's on-disk cache warm (timings: docs/kernels.md). Dynamo guards score_mod and
mask_mod by their code, not their identity, so a fresh ``causal()``, ``alibi(H)`` or
``documents(ids)`` per call does not recompile; shapes are static (each new sequence length
compiles once: the dynamic-shape recompile generated C++ that failed to build for some
score_mods in torch 2.13). Compiled functions are created once, one per grad mode
(switching grad mode between calls made dynamo recompile until it hit its limit and
*silently* fall back to a far slower path; on the CPU every call runs under ``no_grad``),
the recompile limit is raised to ``RECOMPILE_LIMIT`` for this function only, and hitting it
raises instead of falling back. ``with eager(): ...`` runs
FlexAttention uncompiled (dense math, no compile cost) for cheap correctness tests.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from attnkit.backends.base import Backend
from attnkit.call import AttentionCall
from attnkit.costs import CostTable
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask, aligned_query_positions
from attnkit.scores import Softmax

#: Tile size of the BlockMasks (FlexAttention's default sparse block size).
BLOCK_SIZE = 128
#: Distinct compiled variants (shapes × masks × scores) allowed per grad mode before raising.
RECOMPILE_LIMIT = 64
#: Largest softcap for which the CPU anchor-key lse is exact (see the module docstring).
_MAX_ANCHORED_SOFTCAP = 80.0
#: Smallest query/key head dim the compiled CPU kernel is given (``_widen_small_heads``).
_MIN_CPU_HEAD_DIM = 24

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

_eager_depth = 0


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Within this block the flex backend runs FlexAttention uncompiled: the same
    ``score_mod``/``BlockMask`` through FlexAttention's dense math, no compile cost (and
    float64 works). For correctness tests; it is slow and holds ``Tq × Tk`` scores."""
    global _eager_depth
    _eager_depth += 1
    try:
        yield
    finally:
        _eager_depth -= 1


def is_eager() -> bool:
    """True inside ``eager()``."""
    return _eager_depth > 0


# -- BlockMask from the analytic block structure -------------------------------------------


def _ordered(selected: Tensor) -> tuple[Tensor, Tensor]:
    """``(counts [..., nq], indices [..., nq, nk])`` int32 with the selected kv blocks of each
    row first, in increasing order (FlexAttention's ordered block layout)."""
    counts = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)
    return counts, order.to(torch.int32)


def build_block_mask(
    mask: Mask | None,
    Tq: int,
    Tk: int,
    device: torch.device | str,
    anchor_key: bool = False,
) -> BlockMask:
    """FlexAttention ``BlockMask`` for ``mask`` at ``Tq`` queries and ``Tk`` keys, built from
    the analytic ``mask.blocks(Tq, Tk, 128, 128)`` without evaluating ``Tq × Tk`` pairs.

    Tensors are ``[Bm, Hm, nq, nk]`` (``Bm``/``Hm`` 1 when the pattern does not depend on
    batch/head; FlexAttention broadcasts them). With ``anchor_key`` the mask covers ``Tk + 1``
    keys and the extra key ``Tk`` is visible from every query (the CPU lse anchor). Uncached:
    ``flex`` caches it on the mask; benchmarks call this to time mask building.
    """
    device = torch.device(device)
    if mask is None:
        nq, nk = -(-Tq // BLOCK_SIZE), -(-Tk // BLOCK_SIZE)
        kinds = torch.full((1, 1, nq, nk), FULL, dtype=torch.int8, device=device)
        predicate = None
    else:
        kinds = mask.blocks(Tq, Tk, BLOCK_SIZE, BLOCK_SIZE, device).kinds
        predicate = mask.mask_mod(Tq, Tk)
    if anchor_key:
        kinds = _with_anchor_tiles(kinds, Tk)
    partial_counts, partial_indices = _ordered(kinds == PARTIAL)
    full_counts, full_indices = _ordered(kinds == FULL)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=_mask_mod(predicate, Tk, anchor_key),
        seq_lengths=(Tq, Tk + int(anchor_key)),
        # The transposed (query-block) indices serve only the backward pass, which
        # FlexAttention lacks on the CPU; skipping them makes the build several times cheaper.
        compute_q_blocks=device.type != "cpu",
    )


def _with_anchor_tiles(kinds: Tensor, Tk: int) -> Tensor:
    """Make the tile holding key ``Tk`` live for every query tile: a new partial column when
    ``Tk`` is a multiple of the block size, else the last column becomes at least partial."""
    if Tk % BLOCK_SIZE == 0:
        extra = torch.full_like(kinds[..., :1], PARTIAL)
        return torch.cat([kinds, extra], dim=-1)
    last = kinds[..., -1:]
    return torch.cat([kinds[..., :-1], torch.where(last == EMPTY, PARTIAL, last)], dim=-1)


def _mask_mod(predicate: MaskMod | None, Tk: int, anchor_key: bool) -> MaskMod | None:
    if not anchor_key:
        return predicate
    if predicate is None:

        def anchored_full(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx <= Tk

        return anchored_full

    def anchored(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # The clamp keeps index-based masks (documents) inside their tables at kv_idx == Tk.
        return (kv_idx == Tk) | predicate(b, h, q_idx, torch.clamp(kv_idx, max=Tk - 1))

    return anchored


def cached_block_mask(
    mask: Mask | None, Tq: int, Tk: int, device: torch.device, anchor_key: bool = False
) -> BlockMask | None:
    """The call's BlockMask, cached on the mask (module-wide when there is no mask); None
    for no mask and no anchor key (FlexAttention then visits every tile unmasked)."""
    key = ("flex_block_mask", Tq, Tk, str(device), anchor_key)
    if mask is not None:
        return mask.cached(key, lambda: build_block_mask(mask, Tq, Tk, device, anchor_key))
    if not anchor_key:
        return None
    return _bounded_get(_UNMASKED, key, lambda: build_block_mask(None, Tq, Tk, device, True))


_UNMASKED: dict[tuple, object] = {}
_SCORE_MODS: dict[tuple, tuple] = {}
_CACHE_ENTRIES = 64


def _bounded_get(store: dict, key: tuple, build: Callable[[], object]) -> object:
    if key not in store:
        if len(store) >= _CACHE_ENTRIES:
            store.clear()
        store[key] = build()
    return store[key]


# -- score_mod: AttentionCall.log_weights, one pair at a time ------------------------------


def _cached_log_counts(call: AttentionCall) -> Tensor | float | None:
    """``log n_i`` for length-scaled scores: a float without a mask (every row sees ``Tk``),
    else the ``[Bm, Hm, Tq]`` tensor cached on the mask (one tensor object per mask and size,
    so equal calls find the same cached score_mod, which is keyed by the tensor's identity)."""
    if not call.score.needs_row_counts:
        return None
    if call.mask is None:  # the call's own (float32) value, so results match the reference
        return float(call.log_counts()[0, 0, 0])
    key = ("flex_log_counts", call.Tq, call.Tk, str(call.device))
    return call.mask.cached(key, call.log_counts)


def score_mod_for(call: AttentionCall, anchor_key: bool = False) -> ScoreMod | None:
    """FlexAttention ``score_mod`` computing ``call``'s log-weight of one pair, or None for
    plain softmax without bias. Equal calls get the same function object (cached). With
    ``anchor_key`` key ``Tk`` gets log-weight 0."""
    plain = type(call.score) is Softmax and call.score.softcap is None and call.bias is None
    if plain and not anchor_key:
        return None
    log_counts = _cached_log_counts(call)
    key = (call.score, id(call.bias), id(log_counts), call.Tq, call.Tk, anchor_key)
    entry = _bounded_get(
        _SCORE_MODS,
        key,
        # The entry keeps bias and log_counts alive so their ids stay unique while cached.
        lambda: (_make_score_mod(call, log_counts, anchor_key), call.bias, log_counts),
    )
    return entry[0]


def _make_score_mod(
    call: AttentionCall, log_counts: Tensor | float | None, anchor_key: bool
) -> ScoreMod:
    score, bias, Tq, Tk = call.score, call.bias, call.Tq, call.Tk
    if isinstance(log_counts, Tensor):
        per_batch = log_counts.shape[0] > 1
        per_head = log_counts.shape[1] > 1

    def score_mod(s: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if bias is not None:
            s = s + bias.value(h, aligned_query_positions(q_idx, Tq, Tk), kv_idx).to(s.dtype)
        s = score.cap(s)
        counts = log_counts
        if isinstance(log_counts, Tensor):
            counts = log_counts[b if per_batch else 0, h if per_head else 0, q_idx].to(s.dtype)
        lw = score.log_weight(s, Tk, counts)
        if anchor_key:
            lw = torch.where(kv_idx == Tk, torch.zeros_like(lw), lw)
        return lw

    score_mod.__name__ = f"score_mod_{score.name}" + (f"_{bias.name}" if bias else "")
    return score_mod


# -- compiled FlexAttention --------------------------------------------------------------


def _flex_inference(q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux):
    return flex_attention(q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux=return_aux)


def _flex_training(q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux):
    # A separate function (its own code object, so its own dynamo cache) for grad mode.
    return flex_attention(q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux=return_aux)


_COMPILED: dict[bool, Callable] = {}


def compiled_flex(grad_enabled: bool) -> Callable:
    """The compiled FlexAttention for one grad mode (created once per process)."""
    if grad_enabled not in _COMPILED:
        _COMPILED[grad_enabled] = torch.compile(
            # Static shapes: with automatic dynamic shapes, the recompile for a second length
            # generated C++ that does not compile for some score_mods in torch 2.13 (inductor
            # CppCompileError "cur_qSplitSize3 was not declared", softplus_l1 at T=1024 then
            # 2048). Each new length costs one compile instead; the kernels are cached.
            _flex_training if grad_enabled else _flex_inference,
            fullgraph=True,
            dynamic=False,
        )
    return _COMPILED[grad_enabled]


def _call_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux):
    if is_eager():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            return flex_attention(
                q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux=return_aux
            )
    fn = compiled_flex(torch.is_grad_enabled())
    try:
        with torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        ):
            return fn(q, k, v, score_mod, block_mask, scale, enable_gqa, return_aux)
    except torch._dynamo.exc.FailOnRecompileLimitHit as error:
        raise RuntimeError(
            f"flex: more than {RECOMPILE_LIMIT} compiled variants (shapes x masks x scores) "
            "in this process; attnkit refuses to fall back silently to uncompiled "
            "FlexAttention. Reuse shapes and mask/score objects, raise "
            "attnkit.backends.flex.RECOMPILE_LIMIT, or use backend='chunked'"
        ) from error


# -- the backend -------------------------------------------------------------------------


def _lse_by_anchor(call: AttentionCall) -> bool:
    return call.device.type == "cpu" and call.needs_lse


def _anchor_is_exact(call: AttentionCall) -> bool:
    # unnormalised scores: sigmoid's log w <= 0 = the anchor's log-weight; relu's log(s / Tk)
    # passes 80 only for scores beyond e^80 Tk
    if not call.score.normalized:
        return True
    cap = call.score.softcap
    return type(call.score) is Softmax and cap is not None and cap <= _MAX_ANCHORED_SOFTCAP


def _supports(call: AttentionCall) -> str | None:
    if call.device.type != "cpu":
        return None
    if call.needs_grad:
        return (
            "FlexAttention has no backward pass on the CPU (torch 2.13); use chunked for training"
        )
    if call.dtype == torch.float64 and not is_eager():
        return "compiled FlexAttention on the CPU takes float32, float16 or bfloat16, not float64"
    if call.needs_lse and not _anchor_is_exact(call):
        return (
            "compiled FlexAttention on the CPU returns no log-sum-exp (torch 2.13) and attnkit's "
            f"anchor-key workaround is exact only for sigmoid or softmax with softcap <= "
            f"{_MAX_ANCHORED_SOFTCAP:g}, not {call.score.describe()}"
        )
    return None


def _anchored_kv(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``k [B, H, Tk + 1, D]`` and ``v [B, H, Tk + 1, Dv + 2]``: real values become
    ``[v, 1, 0]``, the anchor key ``Tk`` (zero key; its score is set by score_mod) carries
    ``[0, .., 0, 0, 1]``."""
    B, H, Tk, Dv = v.shape
    k_out = k.new_zeros(B, H, Tk + 1, k.shape[-1])
    k_out[:, :, :Tk] = k
    v_out = v.new_zeros(B, H, Tk + 1, Dv + 2)
    v_out[:, :, :Tk, :Dv] = v
    v_out[:, :, :Tk, Dv] = 1
    v_out[:, :, Tk, Dv + 1] = 1
    return k_out, v_out


def _widen_small_heads(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``q``/``k`` zero-padded to ``_MIN_CPU_HEAD_DIM`` head dims when smaller (``q.k`` and the
    explicit scale unchanged), to keep the compiled CPU kernel off a torch 2.13 inductor bug.

    The kernel computes ``q @ k^T`` per kv tile (up to 128 keys) with a micro-GEMM over
    16-key column blocks (``GemmBlocking(1, 16, 1)``, BLOCK_M = 1). For the tile's last,
    shorter block of ``N`` keys, its "transpose first" variant (``cpp_micro_gemm.py``, taken
    when ``D % VLEN == 0``, ``N % VLEN == 0`` and ``24 * BLOCK_M > D``) ignores ``N``: it
    reads ``16 - N`` keys past the tile and stores 16 scores per row. With 256-bit vectors
    (AVX2, ``VLEN`` = 8 floats) that is ``N = 8``: a kv length (``Tk``, or ``Tk + 1`` with the
    anchor key) ``% 16 == 8`` and head dim 8 or 16. The last row's 8 extra scores then land
    on the first 8 entries of the per-thread running row maxima (right after the
    ``qSplitSize x kvSplitSize`` score buffer, hit when the tile fills it: kv length <= 128),
    so rows 0-7 of the query tile are normalised against
    the dot products with whatever lies past the keys: a mere shift when those are the next
    head's keys, 0 or NaN rows when they are past the tensor (the last batch entry in the
    ``[B, T, H, D]`` layout) or a cache's unwritten slots. With 512-bit vectors ``N % 16``
    is never 0 for ``N < 16``. From 24 dims the kernel takes its inner-product variant, which
    honours ``N``.
    """
    D = q.shape[-1]
    if D >= _MIN_CPU_HEAD_DIM:
        return q, k
    pad = (0, _MIN_CPU_HEAD_DIM - D)
    return torch.nn.functional.pad(q, pad), torch.nn.functional.pad(k, pad)


def _run(call: AttentionCall) -> tuple[Tensor, Tensor | None]:
    cpu = call.device.type == "cpu"
    anchored = _lse_by_anchor(call)
    q = call.q.transpose(1, 2)  # [B, Hq, Tq, D] views: no copy
    k = call.k.transpose(1, 2)
    v = call.v.transpose(1, 2)
    if cpu:  # FlexAttention rejects CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    if anchored:
        # The anchor columns are divided out below; float32 keeps that division exact.
        compute = call.accumulation_dtype
        q = q.to(compute)
        k, v = _anchored_kv(k.to(compute), v.to(compute))
    if cpu and not is_eager():
        q, k = _widen_small_heads(q, k)  # the scale is passed explicitly: unchanged
    block_mask = cached_block_mask(call.mask, call.Tq, call.Tk, call.device, anchored)
    score_mod = score_mod_for(call, anchored)
    native_lse = call.needs_lse and not anchored
    grad_context = torch.no_grad() if cpu else contextlib.nullcontext()
    with grad_context:
        result = _call_flex(
            q,
            k,
            v,
            score_mod,
            block_mask,
            call.scale,
            call.groups > 1,
            AuxRequest(lse=True) if native_lse else None,
        )
    if native_lse:
        out, aux = result
        return out.transpose(1, 2), aux.lse.transpose(1, 2).to(call.accumulation_dtype)
    out = result.transpose(1, 2)  # [B, Tq, Hq, Dv (+ 2)]
    if not anchored:
        return out, None
    Dv = call.Dv
    weight_sum, anchor = out[..., Dv], out[..., Dv + 1]  # Z / (Z + 1), 1 / (Z + 1)
    seen = weight_sum > 0
    values = out[..., :Dv]
    normalized = torch.where(
        seen.unsqueeze(-1), values / weight_sum.unsqueeze(-1), torch.zeros_like(values)
    )
    lse = torch.log(weight_sum) - torch.log(anchor)
    return normalized.to(call.dtype), lse.to(call.accumulation_dtype)


#: Below this many (query x key) pairs, or fewer queries than one tile, compiling (seconds
#: per shape) outweighs any kernel speed-up: decoding and small problems stay elsewhere.
MIN_PAIRS = 512 * 512
MIN_QUERIES = BLOCK_SIZE


def _cost(call: AttentionCall, table: CostTable) -> tuple[float, str]:
    if call.Tq * call.Tk < MIN_PAIRS or call.Tq < MIN_QUERIES:
        return math.inf, (
            f"compiles once per shape (seconds), not worth it for {call.Tq}x{call.Tk} "
            f"(needs >= {MIN_QUERIES} queries and >= {MIN_PAIRS} pairs)"
        )
    dtype, grad = call.dtype, call.needs_grad
    live, partial = 1.0, 0.0
    if call.mask is not None:
        tiles = call.mask.blocks(call.Tq, call.Tk, BLOCK_SIZE, BLOCK_SIZE, call.device)
        live, partial = tiles.live_fraction(), tiles.partial_fraction
    cost = table.value("flex.per_live", dtype, grad) * live
    if not (type(call.score) is Softmax and call.score.softcap is None):
        cost *= table.value("flex.score", dtype, grad)
    if call.bias is not None:
        cost *= table.value("flex.bias", dtype, grad)
    if call.mask is None:
        cost *= table.value("flex.dense", dtype, grad)
    elif call.mask.unravels_grid:
        cost += table.value("flex.grid_partial", dtype, grad) * partial
    cost += table.value("flex.overhead_pairs", dtype, grad) / (call.B * call.Hq * call.Tq * call.Tk)
    return cost, f"computes {live:.0%} of {BLOCK_SIZE}x{BLOCK_SIZE} tiles in one compiled kernel"


BACKEND = Backend(
    name="flex",
    summary=(
        "compiled FlexAttention with analytic cached BlockMasks; any mask/bias/score "
        "(forward-only on the CPU)"
    ),
    supports=_supports,
    run=_run,
    cost=_cost,
)
