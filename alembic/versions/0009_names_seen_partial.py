"""Index only the names a key was seen under besides its row's own name.

``/data?name=`` finds a row by its own name (the primary key) or by a name one
of its keys was seen under (``unified_links.names_seen``). Most links hold just
the row's own name, which the primary key already finds, yet each one put an
entry into the GIN index, and those entries were most of a first load's link
cost. The index now holds only the links whose names differ from their row's.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# names_seen (default collation) compared with the row's name (collation "C").
OTHER_NAMES = """names_seen <> ARRAY[name COLLATE "default"]"""


def upgrade() -> None:
    op.drop_index("ix_unified_links_names_seen", table_name="unified_links")
    op.execute(
        "CREATE INDEX ix_unified_links_names_seen ON unified_links USING gin (names_seen) "
        f"WHERE {OTHER_NAMES}"
    )


def downgrade() -> None:
    op.drop_index("ix_unified_links_names_seen", table_name="unified_links")
    op.execute("CREATE INDEX ix_unified_links_names_seen ON unified_links USING gin (names_seen)")
