"""Errors carrying an errno: the core raises these, the FUSE adapter maps them."""

from __future__ import annotations

import os


class FsError(Exception):
    """A request failed with *errno*; *message* says why, for the log."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err
