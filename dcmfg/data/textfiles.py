"""The one rule for the text files a loader reads (tags, id and word lists, manifests, label names): UTF-8 or an
error naming the file, the line and the byte.

A byte that is not UTF-8 is never replaced: a replacement character would change the text an item is trained and
searched on, and the dataset's fingerprint, without a word. The error says where the first bad byte is, so the
file can be re-saved as UTF-8 (or that line edited); docs/manifest.md says it for users.
"""

from __future__ import annotations

from pathlib import Path

from .base import DatasetError


def not_utf8(path) -> DatasetError:
    """The error for a file that failed to decode as UTF-8: `<file>:<line>: not UTF-8 text (byte 0xe9 at column 12);
    ...` (columns count bytes). Reads the file's bytes once more to find the first bad one."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        start, end = exc.start, exc.end
    else:  # decodes as a whole: the reader's decoder saw something else (a BOM-less UTF-16 file, say)
        return DatasetError(f"{path}: not UTF-8 text")
    line = raw.count(b"\n", 0, start) + 1
    column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
    bad = " ".join(f"0x{b:02x}" for b in raw[start:max(end, start + 1)])
    return DatasetError(f"{path}:{line}: not UTF-8 text (byte {bad} at column {column}); re-save the file as UTF-8")
