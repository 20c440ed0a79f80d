"""The one base class for configuration a user got wrong.

Each stage raises its own subclass (profile, encoder, catalog, cluster, training, retriever,
prompt template, data root) with a message that says what to change. The CLI prints such an
error as one line and exits 2 instead of a traceback; everything else stays a traceback,
since it is a bug or a failure worth its stack.
"""

from __future__ import annotations


class ConfigurationError(ValueError):
    """A setting (environment variable, profile, resource field, config file) is invalid."""


class DataRootError(ConfigurationError):
    """The data root URL names a filesystem that fsspec cannot open here."""


class TableWriteError(OSError):
    """A table (or other output file) could not be written: disk full, permission denied, an
    upload cut short. Nothing was replaced; the previous version, if any, is unchanged."""


def storage_errors() -> tuple[type[BaseException], ...]:
    """The errors a data root that cannot be read raises: an OSError (a local disk, or s3fs's
    translation of a refused request) or botocore's own (an unreachable endpoint, no
    credentials), which are no OSErrors."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # no object-store support installed: only local paths
        return tuple(errors)
    return (*errors, BotoCoreError, ClientError)


def first_line(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
