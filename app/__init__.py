"""The edges: the ``kasparro`` command line (``cli``), the HTTP API (``api``) and the
service that runs ingestion beside it (``service``).

Importing this package builds nothing; :func:`app.api.server.create_app` builds the app.
"""

import observability  # noqa: F401  (structlog first, without rich: see there)
