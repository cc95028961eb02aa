"""The user-mistake exceptions, in a module that imports nothing heavy.

Every console script turns these into one line on stderr and exit status 2;
they live here (not beside torch code) so that reporting a bad argument does
not pay for importing torch. The modules that raise them re-export them.
"""


class ConfigError(ValueError):
    """A configuration value is not allowed. The message is one line."""


class DataError(ValueError):
    """A data source cannot be read or does not fit the model. One line."""


class ArchError(ValueError):
    """An architecture dict is not valid for its space. The message is one line."""


def one_line(text, limit: int = 300) -> str:
    """Any message (an exception, a multi-line string) as one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    if not flat and isinstance(text, BaseException):
        flat = type(text).__name__
    return flat[:limit]
