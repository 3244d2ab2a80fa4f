"""``backend="auto"``: rank the backends by their estimated cost on the device that runs.

Each backend record estimates its own cost (``Backend.cost``) from the device's cost table
(``attnkit.calibration.table_for``: measured once per machine, or conservative with
``ATTNKIT_CALIBRATION=off``), in units of one dense SDPA call of the same shape. A backend
whose estimate is infinite is no candidate here (a path that does not exist or is emulated on
this device), and its reason is shown by ``attnkit.explain``. A signed score runs as two
passes and costs twice.
"""

from __future__ import annotations

import math

from attnkit.backends import BACKENDS
from attnkit.calibration import table_for
from attnkit.call import AttentionCall
from attnkit.costs import CostTable


def estimated_costs(
    call: AttentionCall, table: CostTable | None = None
) -> dict[str, tuple[float, str]]:
    """Each ranked backend's estimated time for ``call`` in dense-SDPA units, with its basis;
    ``table`` defaults to the table of the call's device."""
    table = table_for(call.device) if table is None else table
    passes = len(call.passes())
    costs = {}
    for name, backend in BACKENDS.items():
        if backend.cost is None:
            continue
        cost, why = backend.cost(call, table)
        if passes > 1 and not math.isinf(cost):
            cost, why = cost * passes, f"{why}, {passes} passes"
        costs[name] = (cost, why)
    return costs


def auto_preferences(call: AttentionCall) -> list[tuple[str, str, bool]]:
    """Backends in order of preference for ``call``: ``(name, reason, candidate)``. The first
    candidate whose ``supports`` accepts the call runs; the dense reference always comes last,
    and backends that are no candidate here come after it with the reason."""
    ranked = sorted(estimated_costs(call).items(), key=lambda item: item[1][0])
    order = [
        (name, f"estimated {cost:.2f}x the time of dense SDPA: {why}", True)
        for name, (cost, why) in ranked
        if not math.isinf(cost)
    ]
    order.append(("reference", "only the dense reference can run this call", True))
    order += [
        (name, f"not a candidate here: {why}", False)
        for name, (cost, why) in ranked
        if math.isinf(cost)
    ]
    return order
