"""The transformer predictor: N learned queries -> N (class, mask embedding) pairs.

This is the original ``TransformerPredictor`` with ``mask_classification=True``: a DETR decoder
(no encoder layers) attends from the queries to one backbone/encoder feature map; a linear head
gives K+1 class logits per query (the last is "no object") and a 3-layer MLP gives a mask
embedding whose dot product with the per-pixel embeddings is the query's mask logit map.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from maskformer.models.pixel_decoder import c2_xavier_fill
from maskformer.models.position_encoding import PositionEmbeddingSine
from maskformer.models.tracing import is_tracing
from maskformer.models.transformer import TransformerDecoder


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskEinsum(torch.autograd.Function):
    """``einsum("lbqc,bchw->lbqhw", mask_embed, mask_features)`` whose backward skips zero rows.

    In training only the masks matched to a target get a gradient (the mask losses read no other
    query's mask; the class loss reads no mask), about N/Q of the L*Q rows of the incoming
    gradient. The dense backward would spend the rest of its two [L*Q x C x H*W] products on
    zeros; this one multiplies only the rows that are not all zero. Same values as the einsum's
    own backward (up to summation order), computed in the forward's dtype as autocast would.
    """

    @staticmethod
    def forward(ctx, mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("lbqc,bchw->lbqhw", mask_embed, mask_features)
        ctx.save_for_backward(mask_embed, mask_features)
        ctx.dtype = out.dtype  # autocast may have run the einsum in lower precision
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        mask_embed, mask_features = ctx.saved_tensors
        embed = mask_embed.to(ctx.dtype)  # [L, B, Q, C]
        features = mask_features.to(ctx.dtype).flatten(2)  # [B, C, HW]
        grad = grad.to(ctx.dtype).flatten(3)  # [L, B, Q, HW]
        grad_embed = torch.zeros_like(embed) if ctx.needs_input_grad[0] else None
        # Every row is written below (R = 0 writes zeros), and writing the products in place spares
        # page-faulting fresh [C, HW] buffers, which costs more than the products on a CPU.
        grad_features = torch.empty_like(features) if ctx.needs_input_grad[1] else None
        with torch.autocast(grad.device.type, enabled=False):
            for b in range(grad.shape[1]):
                layer, query = grad[:, b].ne(0).any(-1).nonzero(as_tuple=True)
                g = grad[layer, b, query]  # [R, HW], the rows that are not all zero
                if grad_embed is not None:
                    grad_embed[layer, b, query] = g @ features[b].T
                if grad_features is not None:
                    torch.mm(embed[layer, b, query].T, g, out=grad_features[b])
        return (None if grad_embed is None else grad_embed.to(mask_embed.dtype),
                None if grad_features is None else grad_features.view_as(mask_features).to(mask_features.dtype))


class TransformerPredictor(nn.Module):
    """Queries -> class logits and mask logits, for every decoder layer.

    Args:
        in_channels: channels of the map the decoder attends to (res5, or the pixel decoder's encoder output).
        num_classes: K real classes; the class head has K+1 outputs.
        hidden_dim, num_queries, nheads, dim_feedforward, dropout, dec_layers, pre_norm: the DETR decoder.
        mask_dim: width of the per-pixel embeddings from the pixel decoder.
        enforce_input_proj: add the 1x1 input projection even when ``in_channels == hidden_dim``.
        deep_supervision: also return the predictions of the first ``dec_layers - 1`` layers (in training).

    forward(x [B,C_in,h,w], mask_features [B,mask_dim,H/4,W/4], with_aux: bool | None = None) -> {
        "pred_logits": [B,Q,K+1], "pred_masks": [B,Q,H/4,W/4],
        "aux_outputs": [{"pred_logits", "pred_masks"}] * (dec_layers - 1)   (when with_aux)}
    ``with_aux`` defaults to ``self.training and deep_supervision``: evaluation skips the
    auxiliary mask maps, which it never uses.
    """

    def __init__(self, *, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1, dec_layers: int = 6,
                 pre_norm: bool = False, mask_dim: int = 256, enforce_input_proj: bool = False,
                 deep_supervision: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.deep_supervision = deep_supervision
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_proj:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.decoder = TransformerDecoder(dec_layers, hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor,
                with_aux: bool | None = None) -> dict[str, object]:
        if with_aux is None:
            with_aux = self.training
        with_aux = with_aux and self.deep_supervision
        batch = x.shape[0]
        pos = self.pe_layer(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        memory = self.input_proj(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        # The decoder input is zeros: queries differ only through their learned positional embedding.
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, pos, query_pos, all_layers=with_aux)  # [L, B, Q, C]

        logits = self.class_embed(hs)  # [L, B, Q, K+1]
        mask_embed = self.mask_embed(hs)  # [L, B, Q, D]
        # The sparse backward pays off on CPUs; on GPUs the dense products are cheap and finding
        # the non-zero rows would synchronise the device.
        if (self.training and torch.is_grad_enabled() and mask_features.device.type == "cpu"
                and not is_tracing()):
            masks = MaskEinsum.apply(mask_embed, mask_features)  # [L, B, Q, H/4, W/4]
        else:
            masks = torch.einsum("lbqc,bchw->lbqhw", mask_embed, mask_features)
        # unbind, not indexing: its backward stacks the layers' gradients once, where L separate
        # ``masks[l]`` would each scatter into a zero tensor of the full [L,B,Q,H/4,W/4] size.
        logits, masks = logits.unbind(0), masks.unbind(0)
        out: dict[str, object] = {"pred_logits": logits[-1], "pred_masks": masks[-1]}
        if with_aux:
            out["aux_outputs"] = [{"pred_logits": a, "pred_masks": b} for a, b in zip(logits[:-1], masks[:-1])]
        return out
