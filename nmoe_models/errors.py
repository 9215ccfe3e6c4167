"""Errors of the learning package. nmoe_models imports no networking code, so these are plain
ValueError subclasses; the CLI reports them like the project's NmoeError."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset is missing or a partition request is impossible; the message says what to do."""
