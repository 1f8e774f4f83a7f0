"""Entity tags of ``/data`` pages: the data's version and the page's query.

A page's content depends only on the query and on ``unified_data``, whose version
(migration 0003) changes in every transaction that changes the table. The tag is
weak: two responses with one tag show the same rows but differ in their ``meta``
(request id, latency).
"""

from __future__ import annotations

import hashlib


def data_etag(version: int, query: tuple[object, ...], api_version: str) -> str:
    """The tag of the page ``query`` selects while the data is at ``version``."""
    digest = hashlib.blake2b(repr((api_version, query)).encode(), digest_size=8).hexdigest()
    return f'W/"{version}-{digest}"'


def matches(if_none_match: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag``, by weak comparison
    (RFC 9110 section 13.1.2): ``*``, or any listed tag with the same opaque part."""
    wanted = _opaque(etag)
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or _opaque(candidate) == wanted:
            return True
    return False


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag
