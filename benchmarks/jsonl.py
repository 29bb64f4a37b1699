"""The benchmarks' output: each figure a JSON line on stdout, appended to `--out` when given."""

from __future__ import annotations

import json


def emit(lines, out=None) -> None:
    """Print each dict as one JSON line (flushed, so a long run shows its figures as they come) and append them to
    the file `out` when given."""
    for line in lines:
        text = json.dumps(line)
        print(text, flush=True)
        if out:
            with open(out, "a") as f:
                f.write(text + "\n")
