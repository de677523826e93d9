"""Exceptions raised by the compression package.

Every message names the offending field (or file / tensor key) and says how to fix it, so a
caller can surface it to a user unchanged.
"""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """A LoRA adapter directory or its contents cannot be used (missing file, bad field, bad tensor)."""


class BankFormatError(ValueError):
    """A compressed bank on disk (or in memory) is inconsistent, corrupted or mismatched."""
