"""Small pure parts of the HTTP layer: cursors, request ids, API keys."""

from __future__ import annotations

import base64

import pytest

from app.api.middleware import sane_request_id
from app.api.pagination import CursorError, decode_cursor, encode_cursor
from app.api.security import key_matches


@pytest.mark.parametrize(
    "name", ["bitcoin", "", "zz top", "straße", "ω-token", "a/b?c=d&e", "x" * 500, "'; --"]
)
def test_a_cursor_round_trips_any_name(name: str) -> None:
    cursor = encode_cursor(name)
    assert "=" not in cursor
    assert decode_cursor(cursor) == name


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        "a b",
        base64.urlsafe_b64encode(b"not json").decode().rstrip("="),
        base64.urlsafe_b64encode(b'{"v":2,"after":"a"}').decode().rstrip("="),
        base64.urlsafe_b64encode(b'{"v":1,"after":3}').decode().rstrip("="),
        base64.urlsafe_b64encode(b'{"v":1,"after":"a","x":1}').decode().rstrip("="),
        base64.urlsafe_b64encode(b'["a"]').decode().rstrip("="),
        "A" * 5000,
        "é",
    ],
)
def test_a_malformed_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(CursorError):
        decode_cursor(cursor)


@pytest.mark.parametrize(
    ("raw", "sane"),
    [
        (b"abc-123", True),
        (b"x" * 128, True),
        (b"x" * 129, False),
        (b"", False),
        (b"has space", False),
        (b"tab\there", False),
        ("caf\u00e9".encode(), False),
        (b"\x7f", False),
        (None, False),
    ],
)
def test_request_ids_are_echoed_only_when_sane(raw: bytes | None, sane: bool) -> None:
    assert (sane_request_id(raw) is not None) is sane


def test_any_configured_key_matches_and_nothing_else() -> None:
    keys = ("alpha-key", "bravo-key")
    assert key_matches("alpha-key", keys)
    assert key_matches("bravo-key", keys)
    # Spaces and tabs around the value are not part of it (both ends alike).
    for padded in ("alpha-key ", " alpha-key", "\talpha-key\t"):
        assert key_matches(padded, keys), padded
    for wrong in ("", "alpha", "alpha -key", "ALPHA-KEY", "alpha-key,bravo-key", "é"):
        assert not key_matches(wrong, keys), wrong
    assert not key_matches("anything", ())
