"""The one exception users see when their data is wrong."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, split list, label file or scenario request is invalid.

    The message always names the file (or argument) at fault and says how to fix it, so it can be
    shown to a user as is, before any training starts.
    """
