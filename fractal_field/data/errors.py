"""Exceptions raised by the data package."""

from __future__ import annotations


class DataNotFoundError(FileNotFoundError):
    """No usable copy of a dataset was found.

    The message lists every place that was searched and how to provide the data.
    """


class DataFormatError(ValueError):
    """A data file exists but is truncated, corrupt or not in the expected format.

    The message names the offending file.
    """
