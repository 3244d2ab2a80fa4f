"""Work in progress."""

from attnkit.backends.base import Backend

BACKEND = Backend(
    name="flex",
    summary="(in development)",
    supports=lambda call: "not built yet",
    run=lambda call: (_ for _ in ()).throw(NotImplementedError),
)
