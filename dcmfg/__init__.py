"""dcmfg: mutual contextual relation-guided dynamic graph networks for cross-modal image-text retrieval."""

__version__ = "0.1.0"
