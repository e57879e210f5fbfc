"""The single exception type raised by :mod:`mergeflow.data` for bad input."""


class DataError(ValueError):
    """A data problem the user can fix; the message names the file, task or argument at fault."""
