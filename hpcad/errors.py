"""Exceptions that carry a user-facing message naming the file, node, column or option at fault."""


class HpcadError(Exception):
    """Base class: the CLI prints the message and exits with status 2, without a traceback."""


class InputError(HpcadError):
    """Bad telemetry input (missing or non-numeric columns, empty node, bad timestamps...)."""


class StoreError(HpcadError):
    """An HDF5 file that is missing, truncated, or not in the documented layout."""


class ConfigError(HpcadError):
    """A configuration value that is not valid for the data at hand."""


class TooFewTrainingRows(ConfigError):
    """A node with too few training rows for a model (``data.on_bad_node=skip``: left untrained);
    ``short``: the reason without the advice."""

    def __init__(self, message: str, short: str = "") -> None:
        super().__init__(message)
        self.short = short or message


class LockedError(HpcadError):
    """Another process writes the run folder (or the nightly output folder) now."""


class OutputError(HpcadError):
    """An output that could not be written for want of space (a full file system, a quota)."""
