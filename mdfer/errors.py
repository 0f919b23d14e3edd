"""Errors a user can act on.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the file or key at fault and never carry credentials.
"""


class MdferError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(MdferError):
    """The configuration (or a search space) is invalid; the message names file and key."""


class DataError(MdferError):
    """A dataset or the store holds something unusable; the message names the path."""
