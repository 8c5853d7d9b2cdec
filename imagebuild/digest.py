"""The one digest type: always the string ``sha256:<64 lowercase hex>``."""

from __future__ import annotations

from typing import NewType

Digest = NewType("Digest", str)
"""A content digest, ``sha256:<hex>``; never bare hex."""
