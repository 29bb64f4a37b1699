"""Writing files so that nothing already written is lost (temp file in the same folder + os.replace), and sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it replaces `path` in one step, on any failure
    (an exception, Ctrl-C) it is removed, so neither a reader nor a killed run ever sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches are shared between users of one machine
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> None:
    """Write text atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> str:
    """Write tensors as a safetensors file atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        sha = file_sha256(tmp)
    return sha


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path):
    """A JSON file the project wrote (config.json, meta.json, state.json, ...): a damaged one is one clear error."""
    import json

    from dcmfg.errors import ConfigError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc.__class__.__name__}: {exc}); the file is damaged") from None


def jsonable(x):
    """`x` with NaN/inf as None and numpy scalars as Python numbers, for JSON."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, (np.floating,)):
        return jsonable(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as indented, key-sorted JSON (NaN and inf as null, numpy scalars as numbers), written atomically."""
    write_text_atomic(Path(path), json.dumps(jsonable(obj), indent=1, sort_keys=True) + "\n")

