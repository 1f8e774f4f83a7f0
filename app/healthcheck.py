"""``python -m app.healthcheck``: the container's health check.

Exit 0 when ``GET /health`` of the running ``kasparro serve`` answers 200, else
1 with one line saying why. The address is the one the server wrote to
``SERVE_ADDRESS_FILE`` once listening (so ``--port`` and ``--host`` are
followed), else ``HOST`` and ``PORT``. The standard library only: it runs every
few seconds and must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

TIMEOUT_SECONDS = 3.0


def server_url(env: Mapping[str, str]) -> str:
    """The base URL of the local server, from the address file or HOST/PORT."""
    address_file = env.get("SERVE_ADDRESS_FILE", "").strip()
    if address_file:
        try:
            with open(address_file, encoding="utf-8") as handle:
                url = handle.read().strip()
        except OSError:
            url = ""
        if url:
            return url
    host = env.get("HOST", "").strip() or "127.0.0.1"
    if host == "0.0.0.0":  # noqa: S104 - the wildcard is recognised, not bound
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    port = env.get("PORT", "").strip() or "8000"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    url = server_url(os.environ) + "/health"
    # The server is local: no proxy from the environment applies.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
