"""Exception types. Every error logitguard raises on bad input derives from `LogitguardError`."""


class LogitguardError(Exception):
    """Base class for errors about the user's input; the CLI prints them as `Error: ...`."""


class TableError(LogitguardError, ValueError):
    """A logit table is missing, unreadable, or breaks the table contract (docs/tables.md)."""
