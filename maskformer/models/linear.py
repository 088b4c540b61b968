"""fp32 linear layers on the CPU through oneDNN instead of the BLAS.

PyTorch computes an fp32 ``nn.Linear`` on an x86 CPU with MKL's ``sgemm``. On the AMD EPYC (Zen 5)
machines this project is measured on, MKL runs at about half of what the cores can do (MKL picks
its AVX2 kernels on AMD processors), while oneDNN, which PyTorch uses for convolutions, runs its
AVX-512 kernels. A linear map over ``N`` tokens ``[..., C_in]`` is a 1x1 convolution over a
channels-last batch of 16 images of ``N/16`` tokens, so :func:`onednn_linear` hands it to oneDNN:
the same products and sums (outputs equal ``F.linear``'s up to rounding order) in 0.39-0.76x of the
time in forward and 0.49-0.76x in forward + backward for the layer sizes of Swin-T on 2 threads
(0.55-0.73x for the transformer decoder's, a tie for the small class head);
``python tools/benchmark.py --linear-kernels`` prints the table for the machine it runs on. Not measured on Intel CPUs, where MKL is not handicapped: ``blas`` may be
the better choice there.

:class:`OneDNNLinear` is an ``nn.Linear`` (same parameters and state-dict keys) that takes this path
for fp32 CPU inputs outside autocast and ``F.linear`` otherwise (GPUs, bf16 autocast -- whose CPU
matrix products already go to oneDNN --, tracing for ``torch.compile``/``torch.export``).
:func:`use_onednn_linear` converts a model's ``nn.Linear`` layers in place; ``model.cpu_linear: blas``
in a config keeps PyTorch's default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskformer.models.tracing import is_tracing

__all__ = ["OneDNNLinear", "onednn_linear", "use_onednn_linear"]


# PyTorch sends 1x1 convolutions of fewer images to its BLAS-based kernel when it runs on one thread.
_IMAGES = 16


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` as a oneDNN 1x1 convolution.

    ``x [..., C_in]``, ``weight [C_out, C_in]``, ``bias [C_out]`` -> ``[..., C_out]``. The N tokens are
    viewed (without a copy when ``x`` is contiguous) as a channels-last batch of ``[C_in, N/16, 1]``
    images when 16 divides N, else one ``[C_in, N, 1]`` image; oneDNN writes a channels-last output,
    which is again ``[N, C_out]`` in memory. (PyTorch sends a 1x1 convolution of a batch below 16 on
    one thread to its BLAS-based kernel instead of oneDNN; :class:`OneDNNLinear` then uses ``F.linear``.)
    """
    leading, tokens = x.shape[:-1], x.numel() // x.shape[-1]
    batch = _IMAGES if tokens % _IMAGES == 0 else 1
    images = x.reshape(batch, tokens // batch, 1, x.shape[-1]).permute(0, 3, 1, 2)
    out = F.conv2d(images, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(*leading, weight.shape[0])


def _takes_onednn_path(x: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0:
        return False
    if torch.is_autocast_enabled("cpu") or is_tracing():
        return False
    tokens = x.numel() // x.shape[-1]
    return tokens % _IMAGES == 0 or torch.get_num_threads() > 1


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU forward runs on oneDNN (:func:`onednn_linear`). ``[..., C_in] -> [..., C_out]``."""

    def forward(self, x: Tensor) -> Tensor:
        if _takes_onednn_path(x):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linear(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into an :class:`OneDNNLinear` (in place); returns how many.

    Subclasses are left alone (``nn.MultiheadAttention`` calls its ``out_proj`` weights functionally).
    """
    converted = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            converted += 1
    return converted
