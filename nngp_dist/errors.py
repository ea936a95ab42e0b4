"""Errors a user can act on. The CLI prints them without a traceback and exits non-zero."""

__all__ = ["CorruptStore", "StoreMismatch", "UserError"]


class UserError(ValueError):
    """Bad input, a mismatched store, an unreachable scheduler: the message says what to do."""


class StoreMismatch(UserError):
    """A store made by a different run (spec, data or tile size); nothing was changed.

    ``differences`` lists them, one line each, for callers that phrase their own remedy.
    """

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


class CorruptStore(RuntimeError):
    """A chunk of the store fails its checksum or does not decode, or is missing though its
    completion record says it is written. Nothing was computed from it; the message names the
    array and the tile, and ``nngp-dist verify --store S --repair`` (which finds every such
    chunk and forgets what was computed from it) is the remedy. The CLI exits with status 1."""
