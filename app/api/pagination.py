"""Opaque keyset cursors of ``/data``: base64url of the last name a page showed."""

from __future__ import annotations

import base64
import binascii
import re

import msgspec

MAX_CURSOR_LENGTH = 4096
"""A cursor longer than this was not made by us."""
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"
"""The characters of a cursor: unpadded base64url."""
MAX_ID = 2**53 - 1
"""The largest id a query parameter takes: every integer up to it is exact as
a JSON number, so the OpenAPI document prints the bound exactly."""


class CursorError(ValueError):
    """The cursor was not produced by :func:`encode_cursor`."""


class _Cursor(msgspec.Struct, forbid_unknown_fields=True):
    # A versioned object rather than the bare name, so the format can grow.
    v: int
    after: str


_ALPHABET = re.compile(CURSOR_PATTERN)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Cursor)


def encode_cursor(after: str) -> str:
    """The cursor of the page that starts right after the name ``after``."""
    raw = _encoder.encode(_Cursor(v=1, after=after))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> str:
    """The name a cursor points after.

    Raises:
        CursorError: the cursor is malformed.
    """
    # The decoder would silently skip characters outside the alphabet.
    if len(cursor) > MAX_CURSOR_LENGTH or not _ALPHABET.fullmatch(cursor):
        raise CursorError("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise CursorError("malformed cursor") from None
    if decoded.v != 1 or not _storable(decoded.after):
        raise CursorError("malformed cursor")
    return decoded.after


def _storable(text: str) -> bool:
    """Whether PostgreSQL text can hold ``text``: no U+0000, no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
