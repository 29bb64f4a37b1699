"""Which device a run uses: `auto` is CUDA when present, else the CPU; `cuda:N` and `cpu` as given."""

from __future__ import annotations

from dcmfg.errors import ConfigError

DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def check_device_spec(spec: str) -> str:
    """Refuse a malformed device string before any work (no torch import needed)."""
    s = str(spec).strip().lower()
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise ConfigError(f"device {spec!r} is not one of {DEVICE_HELP}")


def resolve_device(spec: str = "auto"):
    """A torch.device for `spec`; asking for CUDA where there is none is an error naming what exists."""
    import torch

    s = check_device_spec(spec)
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for, but torch sees no CUDA device here; use --device cpu or auto")
        index = int(s[5:]) if ":" in s else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(s)
