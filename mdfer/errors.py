"""Errors a user can act on.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the file or key at fault and never carry credentials.
"""

import re

class MdferError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(MdferError):
    """The configuration (or a search space) is invalid; the message names file and key."""


class DataError(MdferError):
    """A dataset or the store holds something unusable; the message names the path."""


def root_cause(exc: BaseException) -> str:
    """The last `SomeError: message` line of a (remote) traceback, without Ray's log prefixes."""
    lines = [re.sub(r"^(\x1b\[[0-9;]*m)?\([^)]*\)(\x1b\[[0-9;]*m)?\s*", "", line).strip()
             for line in str(exc).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*", line)
              and not line.startswith(("ray.train.", "ray.exceptions."))]
    return causes[-1] if causes else f"{type(exc).__name__}: {lines[0] if lines else ''}"
