"""Errors the backbone registry raises (user-facing: the CLI prints them as one line)."""

from __future__ import annotations

from dcmfg.errors import ConfigError, DcmfgError

OFFLINE_DEFAULTS = "the offline defaults are image 'dinov2-small-imgfocus' and text 'minilm-l6'"


class BackboneUnavailable(DcmfgError):
    """A backbone's weights cannot be loaded here (no hub access, package missing)."""


class UnknownBackbone(ConfigError):
    """A backbone name that is not in the registry."""
