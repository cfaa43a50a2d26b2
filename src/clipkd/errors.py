"""The one exception type that the CLI turns into a one-line message."""


class ClipkdError(Exception):
    """A user-facing problem (bad path, mismatched store, unknown class...), reported in one line."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:limit]


class Interrupted(ClipkdError):
    """A job stopped before it finished (SIGTERM, Ctrl+C): reported in one line, exit code non-zero."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code
