"""The backend record: a name, a ``supports`` check that explains a refusal, and ``run``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from attnkit.call import AttentionCall

#: ``run(call) -> (out [B, Tq, Hq, Dv], lse [B, Tq, Hq] float32 or None)``. ``out`` is the
#: *normalised* output (``AttentionCall.finalize`` applies unnormalised scores); ``lse`` must be
#: returned when ``call.needs_lse``.
RunFn = Callable[[AttentionCall], "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class Backend:
    """One way to execute attention.

    ``supports(call)`` returns None if the backend can run the call, else one sentence saying
    why not (shown to users by ``attnkit.explain`` and in errors).
    """

    name: str
    summary: str
    supports: Callable[[AttentionCall], str | None]
    run: RunFn
