"""The HTTP service: Litestar app, lifespan (pools and ingestion loop), controllers.

Importing this package builds nothing; :func:`app.server.create_app` builds the app.
"""

import observability  # noqa: F401  (structlog first, without rich: see there)
