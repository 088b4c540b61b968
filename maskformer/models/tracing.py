"""Whether ``torch.compile`` or ``torch.export`` is tracing the current call.

Eager-only shortcuts (cached index tensors, oneDNN linear layers, the sparse mask-einsum backward)
step aside while tracing, so that graphs hold the plain operations.
"""

from __future__ import annotations

import torch

__all__ = ["is_tracing"]


def is_tracing() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5
    return torch.compiler.is_compiling() or is_exporting()
