"""Errors a user can act on. The CLI prints them without a traceback and exits non-zero."""

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input, a mismatched store, an unreachable scheduler: the message says what to do."""
