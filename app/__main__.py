"""``python -m app``: the same as the ``kasparro`` command."""

from __future__ import annotations

from app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
