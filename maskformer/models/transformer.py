"""DETR's transformer layers, as MaskFormer uses them (post-norm by default, ReLU FFN, dropout 0.1).

Sequences are batch-first here: ``[B, S, C]``. The parameter names follow the original
(``self_attn``, ``linear1``, ``norm1``, ...) so that published weights map over one-to-one; the
decoder's cross-attention, which the original calls ``multihead_attn``, is ``cross_attn`` here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN over a flattened feature map.

    forward(src [B,S,C], pos [B,S,C] | None) -> [B,S,C]
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
            src = src + self.dropout2(self._ffn(self.norm2(src)))
            return src
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, need_weights=False)[0]))
        src = self.norm2(src + self.dropout2(self._ffn(src)))
        return src


class TransformerEncoder(nn.Module):
    """A stack of encoder layers; with pre-norm a final LayerNorm (as DETR), with post-norm none.

    forward(src [B,S,C], pos [B,S,C] | None) -> [B,S,C]
    """

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if normalize_before else None
        _xavier_init(self)

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the image, FFN.

    forward(tgt [B,Q,C], memory [B,S,C], pos [B,S,C], query_pos [B,Q,C]) -> [B,Q,C]
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor | None,
                query_pos: torch.Tensor | None) -> torch.Tensor:
        key = _with_pos(memory, pos)
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = _with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.cross_attn(_with_pos(x, query_pos), key, memory, need_weights=False)[0])
            tgt = tgt + self.dropout3(self._ffn(self.norm3(tgt)))
            return tgt
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(_with_pos(tgt, query_pos), key, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        tgt = self.norm3(tgt + self.dropout3(self._ffn(tgt)))
        return tgt


class TransformerDecoder(nn.Module):
    """A stack of decoder layers whose every output goes through one shared final LayerNorm.

    forward(tgt [B,Q,C], memory [B,S,C], pos [B,S,C], query_pos [B,Q,C]) -> [L,B,Q,C]
    (the normalised output of each of the L layers; deep supervision uses all of them)
    """

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        _xavier_init(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor | None,
                query_pos: torch.Tensor | None, all_layers: bool = True) -> torch.Tensor:
        outputs = []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, memory, pos, query_pos)
            if all_layers or i == len(self.layers) - 1:
                outputs.append(self.norm(tgt))
        return torch.stack(outputs)


def _xavier_init(module: nn.Module) -> None:
    # The original initialises every weight matrix of its transformer with xavier-uniform; this
    # matters for training from scratch (near-zero inits leave all queries predicting alike).
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
