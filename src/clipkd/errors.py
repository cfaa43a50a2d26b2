"""The one exception type that the CLI turns into a one-line message."""


class ClipkdError(Exception):
    """A user-facing problem (bad path, mismatched store, unknown class...), reported in one line."""
