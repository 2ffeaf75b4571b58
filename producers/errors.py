"""Producer errors: bad datasets, model files or attack names. The CLI prints them as `Error: …`."""

from logitguard.errors import LogitguardError


class ProducerError(LogitguardError, ValueError):
    """The producer cannot do what was asked (missing data files, unknown attack, bad model file, …)."""
