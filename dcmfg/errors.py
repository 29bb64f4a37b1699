"""Errors that are the user's input, not our bug: the CLI prints them as one line."""

from __future__ import annotations


class DcmfgError(Exception):
    """Base for errors about user input (config, files, names); the message says what to do."""


class ConfigError(DcmfgError, ValueError):
    """A config key that does not exist, a value of the wrong type, an incompatible checkpoint."""


class Interrupted(DcmfgError):
    """Ctrl-C: the command stops with one line saying what was kept (exit code 130)."""


def is_user_error(exc: BaseException) -> bool:
    from dcmfg.data.base import DatasetError

    return isinstance(exc, (DcmfgError, DatasetError, FileNotFoundError))
