"""Work in progress."""

from attnkit.backends.base import Backend

BACKEND = Backend(
    name="chunked",
    summary="(in development)",
    supports=lambda call: "not built yet",
    run=lambda call: (_ for _ in ()).throw(NotImplementedError),
)
