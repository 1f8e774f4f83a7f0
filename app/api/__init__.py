"""The HTTP API: the Litestar app (:func:`app.api.server.create_app`), its
controllers, response bodies and the per-request wrappers (request id, HEAD,
header limits)."""
