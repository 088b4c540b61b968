"""Swin Transformer as the original MaskFormer runs it, on timm's building blocks and weight layout.

timm's ``SwinTransformer`` differs numerically from the Swin that MaskFormer uses (an mmseg-style port):
timm rolls before padding, shrinks the window and drops the shift on small feature maps, and has a
single final norm. This module keeps the original semantics:

* each stage output (taken before the next stage's patch merging) goes through its own LayerNorm
  ``norm0..norm3``; there is no final norm and no head;
* every block pads its map (right/bottom) to a multiple of the window *before* the cyclic shift, and
  the shifted-window mask is built on the padded size with the value -100;
* the window is never shrunk and odd blocks are always shifted by ``window // 2``;
* the patch embedding pads the image to a multiple of the patch size, patch merging pads odd sizes;
* drop path is applied to both residual branches, its rate linear in the block index.

So one model serves every input size. The parameter names are timm's (``patch_embed``,
``layers.{i}.downsample`` at the *start* of stage ``i >= 1``, ``layers.{i}.blocks.{j}.attn.qkv`` ...)
plus ``norm0..norm3``, so timm checkpoints load directly (without ``head.*`` and ``norm.*``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging, get_relative_position_index
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from maskformer.models.tracing import is_tracing

__all__ = ["SWIN_VARIANTS", "SwinTransformer", "SwinStage", "SwinBlock", "WindowAttention", "window_layout"]

# Architectures of the timm Swin names served by this module (timm registers the same values).
SWIN_VARIANTS: dict[str, dict] = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
    "swin_base_patch4_window12_384": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
    ),
    "swin_large_patch4_window7_224": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7
    ),
    "swin_large_patch4_window12_384": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12
    ),
}


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B * num_windows, window_size**2, C], row-major windows."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


class WindowLayout(NamedTuple):
    """Where each token of an H x W map goes when a block cuts it into (shifted, padded) windows.

    ``gather`` [Hp*Wp]: for each slot of the windowed sequence (windows in row-major order, tokens
    row-major inside a window), the index of the source token in the flattened map.
    ``padding`` [P] or None: the slots that are padding (their ``gather`` entry is a dummy 0; the caller
    fills them with what a zero token gives).
    ``scatter`` [H*W]: for each source token, its slot; the inverse of ``gather``.
    ``mask`` [num_windows, 1, N, N] or None: the additive shifted-window attention mask, N = window**2.
    """

    gather: Tensor
    padding: Tensor | None
    scatter: Tensor
    mask: Tensor | None


def window_layout(height: int, width: int, window_size: int, shift: int, device: torch.device) -> WindowLayout:
    """The original's pad (right/bottom, to a multiple of the window) -> cyclic shift by ``-shift`` ->
    window partition, as index tensors, so that attention moves its tokens with one gather and one
    scatter instead of a copy for each step. Cached per size, shift and device (every block of a
    stage, and every forward at the same size, reuses it), except while torch.compile/export traces,
    where it becomes part of the graph.
    """
    if is_tracing():
        return _window_layout(height, width, window_size, shift, device)
    # Cached tensors made under inference_mode could not be saved for a later backward.
    with torch.inference_mode(False):
        return _cached_window_layout(height, width, window_size, shift, device)


def _window_layout(height: int, width: int, window_size: int, shift: int, device: torch.device) -> WindowLayout:
    # Built with shape-static operations only, so that tracing needs no data-dependent sizes.
    ws = window_size
    padded_h, padded_w = height + (-height % ws), width + (-width % ws)
    num_tokens = height * width
    # Run the original's steps on a map of token indices; padding holds the out-of-range index num_tokens.
    index = torch.arange(num_tokens, device=device).view(1, height, width, 1)
    index = F.pad(index, (0, 0, 0, padded_w - width, 0, padded_h - height), value=num_tokens)
    if shift:
        index = torch.roll(index, shifts=(-shift, -shift), dims=(1, 2))
    gather = window_partition(index, ws).flatten()
    is_padding = gather == num_tokens
    # Token slots first (in slot order), then the padding slots.
    slots = torch.argsort(is_padding.to(torch.int32), stable=True)
    token_slots, padding_slots = slots[:num_tokens], slots[num_tokens:]
    scatter = torch.empty_like(token_slots).index_copy_(0, gather[token_slots], token_slots)
    padding = padding_slots if padded_h * padded_w > num_tokens else None
    gather = gather.masked_fill(is_padding, 0)

    mask = None
    if shift:
        # After the shift a window may hold tokens of up to four regions that are not neighbours in the
        # image; pairs from different regions get -100 (the original's value, not -inf).
        region = torch.zeros(1, padded_h, padded_w, 1, device=device)
        bands = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for i, rows in enumerate(bands):
            for j, cols in enumerate(bands):
                region[:, rows, cols, :] = 3 * i + j
        region = window_partition(region, ws).squeeze(-1)  # [num_windows, N]
        different = region.unsqueeze(1) != region.unsqueeze(2)
        mask = torch.zeros(different.shape, device=device).masked_fill_(different, -100.0).unsqueeze(1)
    return WindowLayout(gather, padding, scatter, mask)


_cached_window_layout = functools.lru_cache(maxsize=32)(_window_layout)


class WindowAttention(nn.Module):
    """(Shifted) window multi-head self-attention over a [B, H, W, C] map, with a learned relative position bias.

    Computes what the original computes: pad the map right/bottom with zeros to multiples of the window,
    roll it by ``-shift_size``, attend inside each window (with the shifted-window mask), undo the roll
    and crop. It is arranged to do less work: the tokens are projected to q/k/v *before* being gathered
    into windows (a zero padding token's projection is just the qkv bias), and the output projection
    runs after they are scattered back, so padding costs no matrix products. Parameter names are timm's.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Recomputed, never loaded: the official checkpoints carry it, timm's do not.
        self.register_buffer(
            "relative_position_index", get_relative_position_index(window_size, window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """[num_heads, N, N], N = window_size**2."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        B, H, W, C = x.shape
        n = self.window_size * self.window_size
        layout = window_layout(H, W, self.window_size, self.shift_size, x.device)
        qkv = self.qkv(x).reshape(B, H * W, 3 * C).index_select(1, layout.gather)  # [B, Hp*Wp, 3C], window order
        if layout.padding is not None:
            qkv[:, layout.padding] = 0.0 if self.qkv.bias is None else self.qkv.bias.to(qkv.dtype)
        q, k, v = qkv.view(-1, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

        attn_bias = self.relative_position_bias().unsqueeze(0)  # [1, heads, N, N]
        if layout.mask is not None:
            # [num_windows, heads, N, N]; the mask depends on the window's position only, so repeat it over B.
            attn_bias = (attn_bias + layout.mask).expand(B, -1, -1, -1, -1).reshape(-1, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))  # [B*nW, heads, N, C/heads]

        out = out.transpose(1, 2).reshape(B, -1, C).index_select(1, layout.scatter)  # [B, H*W, C], map order
        return self.proj(out).view(B, H, W, C)


class SwinBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)), on [B, H, W, C] maps of any size; drop path on both branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, window_size // 2 if shift else 0, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional 2x2 patch merging (timm places it at the start of stages 1..3), then ``depth`` blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: Sequence[float] = (),
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                SwinBlock(dim, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          drop_path=drop_path[i])
                for i in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, H, W, C_in] -> [B, ceil(H/2), ceil(W/2), C] (or the same size without downsampling)."""
        x = self.downsample(x)
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.blocks(x)
        for block in self.blocks:
            # Keeps only each block's input; the block runs again in backward (same dropout masks).
            x = checkpoint(block, x, use_reentrant=False)
        return x


class SwinTransformer(nn.Module):
    """Swin backbone with MaskFormer's semantics (see the module docstring).

    ``forward(x [B, 3, H, W]) -> [B, C*2**i, H_i, W_i] for i in 0..3`` (NCHW), with
    ``H_0 = ceil(H / patch_size)`` and each later stage half the size (rounded up): strides 4, 8, 16, 32
    for patch size 4 and H, W multiples of 32.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        patch_size: int = 4,
        in_chans: int = 3,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.out_channels = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            first = sum(depths[:i])
            stages.append(
                SwinStage(
                    in_dim=self.out_channels[max(i - 1, 0)],
                    dim=self.out_channels[i],
                    depth=depth,
                    num_heads=heads,
                    window_size=window_size,
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=rates[first : first + depth],
                )
            )
        self.layers = nn.Sequential(*stages)
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward instead of keeping its activations (training memory)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)  # [B, H/4, W/4, C]
        features = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            norm = getattr(self, f"norm{i}")
            features.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return features


def _init_weights(module: nn.Module) -> None:
    # The original's init: truncated normal linear weights, zero biases, unit LayerNorms
    # (the patch-embedding conv keeps PyTorch's default).
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
