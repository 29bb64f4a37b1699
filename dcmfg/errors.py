"""Errors that are the user's input or the user's machine, not our bug: the CLI prints them as one line (exit 2)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator


class DcmfgError(Exception):
    """Base for errors about user input (config, files, names); the message says what to do."""


class ConfigError(DcmfgError, ValueError):
    """A config key that does not exist, a value of the wrong type, an incompatible checkpoint."""


class Interrupted(DcmfgError):
    """Ctrl-C: the command stops with one line saying what was kept (exit code 130)."""


class WriteFailed(DcmfgError):
    """A file could not be written (no space left, a read-only folder, a quota): the message names the file and
    the operating system's error; what was written before is left as it was."""


def os_error_text(exc: BaseException) -> str:
    """`[Errno 28] No space left on device` for an OSError (without the temporary file's name it may carry), and
    for a library error that quotes the OS error as `(os error 28)` (safetensors does)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"[Errno {exc.errno}] {exc.strerror}"
    quoted = re.search(r"\(os error (\d+)\)", str(exc))
    if quoted:
        return f"[Errno {quoted.group(1)}] {os.strerror(int(quoted.group(1)))}"
    return str(exc)


@contextlib.contextmanager
def writing(path, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn an OSError (and the exception types in `also`, e.g. a library's own I/O error) raised while writing
    `path` into one `WriteFailed` naming `path`: the file the user knows, not a temporary one beside it."""
    try:
        yield
    except (OSError, *also) as exc:
        raise WriteFailed(f"cannot write {Path(path)}: {os_error_text(exc)}") from exc


def is_user_error(exc: BaseException) -> bool:
    from dcmfg.data.base import DatasetError  # dcmfg.data sits above this module

    return isinstance(exc, (DcmfgError, DatasetError, FileNotFoundError))
