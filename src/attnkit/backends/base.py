"""The backend record: a name, a ``supports`` check that explains a refusal, ``run``, and the
cost estimate ``auto`` ranks it by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from attnkit.call import AttentionCall
from attnkit.costs import CostTable

#: ``run(call) -> (out [B, Tq, Hq, Dv], lse [B, Tq, Hq] float32 or None)``. ``out`` is the
#: *normalised* output (``AttentionCall.finalize`` applies unnormalised scores); ``lse`` must be
#: returned when ``call.needs_lse``.
RunFn = Callable[[AttentionCall], "tuple[Tensor, Tensor | None]"]
#: ``cost(call, table) -> (estimate, basis)``: the call's estimated time in units of one dense
#: SDPA call of its shape on its device, from the device's cost table, and one phrase saying
#: what it counts. ``math.inf`` takes the backend out of ``auto``'s ranking for the call (a
#: path that does not exist or is emulated here), and the phrase says why.
CostFn = Callable[[AttentionCall, CostTable], "tuple[float, str]"]


@dataclass(frozen=True)
class Backend:
    """One way to execute attention.

    ``supports(call)`` returns None if the backend can run the call, else one sentence saying
    why not (shown to users by ``attnkit.explain`` and in errors). ``cost`` is its estimate for
    ``auto``; a backend without one runs only when selected by name.
    """

    name: str
    summary: str
    supports: Callable[[AttentionCall], str | None]
    run: RunFn
    cost: CostFn | None = None
