"""dcmfg: mutual contextual relation-guided dynamic graph networks for cross-modal image-text retrieval."""

import warnings as _warnings

__version__ = "0.1.0"

# torch_geometric calls torch.jit.script at import time, and torch 2.14 deprecates it: a warning about a library's
# internals that no dcmfg user can act on, printed by every command and notebook. Only that message is silenced.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
