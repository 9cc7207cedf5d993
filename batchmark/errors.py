"""Errors that carry a message telling the user what to fix."""


class BatchmarkError(Exception):
    """Base class: the message is shown to the user as it is."""


class ConfigError(BatchmarkError):
    """A setting, definition, CLI argument or DAG param is wrong."""


class ServiceUnavailable(BatchmarkError):
    """A service (broker, Postgres, Spark) cannot be reached."""
