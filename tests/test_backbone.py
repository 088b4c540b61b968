"""Backbones: interface, FrozenBN, parameter counts, R101c, Swin against Hugging Face, weight files, key maps."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from maskformer.interop import resnet_d2_to_ours, swin_hf_to_ours, swin_official_to_ours
from maskformer.models.backbone import Backbone, build_backbone, load_backbone_weights
from maskformer.models.swin import SWIN_VARIANTS, SwinTransformer, window_layout, window_partition

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def check_interface(backbone: Backbone, channels: list[int], height: int, width: int) -> dict[str, torch.Tensor]:
    assert backbone.out_features == ["res2", "res3", "res4", "res5"]
    assert backbone.out_channels == dict(zip(backbone.out_features, channels))
    assert backbone.out_strides == STRIDES
    assert backbone.size_divisibility == 32
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, height, width))
    assert list(out) == backbone.out_features
    for name, feature in out.items():
        stride = STRIDES[name]
        assert feature.shape == (2, backbone.out_channels[name], height // stride, width // stride), name
    return out


# ------------------------------------------------------------------------------------------------
# ResNet and FrozenBN
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18() -> Backbone:
    torch.manual_seed(0)
    return build_backbone("resnet18")


def test_resnet_interface(resnet18):
    check_interface(resnet18, [64, 128, 256, 512], 64, 96)
    check_interface(build_backbone("test_resnet"), [32, 48, 192, 96], 96, 64)


def test_frozen_bn_is_buffers_and_eval_like(resnet18):
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet18.modules())
    frozen = [m for m in resnet18.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 20  # stem + 2 per block x 8 + 3 shortcuts
    assert all(m.eps == 1e-5 for m in frozen)
    assert not [n for n, _ in resnet18.named_parameters() if "bn" in n or "downsample.1" in n]
    # Non-trivial statistics, so that batch statistics would give a different answer.
    torch.manual_seed(1)
    for m in frozen:
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = resnet18.train()(x)
        eval_out = resnet18.eval()(x)
    for k, v in resnet18.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in a train-mode forward"
    # Reference: an ordinary BatchNorm model with the same weights, in eval mode.
    reference = build_backbone("resnet18", freeze_bn=False).eval()
    reference.load_state_dict(before, strict=False)
    with torch.no_grad():
        ref_out = reference(x)
    for name in eval_out:
        torch.testing.assert_close(train_out[name], eval_out[name])
        torch.testing.assert_close(eval_out[name], ref_out[name], rtol=1e-4, atol=1e-5)


def test_frozen_bn_keeps_bf16_activations_under_autocast(resnet18):
    from maskformer.models.backbone import FrozenBatchNorm2d as FusedFrozenBatchNorm2d

    bn = FusedFrozenBatchNorm2d(8)
    torch.manual_seed(0)
    bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    x = torch.randn(2, 8, 6, 6)
    # torchvision's formula, computed by its own forward
    torch.testing.assert_close(bn(x), FrozenBatchNorm2d.forward(bn, x), rtol=1e-5, atol=1e-6)
    scale, shift = bn.scale_and_shift()
    torch.testing.assert_close(bn(x), x * scale[:, None, None] + shift[:, None, None], rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert bn(x.bfloat16()).dtype == torch.bfloat16
        features = resnet18.eval()(torch.randn(1, 3, 64, 64))
    # torchvision's FrozenBatchNorm2d promotes to fp32 here, which makes every bf16 convolution cast again
    assert all(f.dtype == torch.bfloat16 for f in features.values())


@pytest.mark.parametrize("name, folded", [("resnet18", 20), ("resnet101c", 106)])
def test_frozen_bn_folded_into_convolutions(name, folded):
    """Every frozen BN of a ResNet (blocks, shortcuts, plain and deep stem) is computed by the conv before
    it; outputs, state-dict keys and the convolutions' gradients are those of conv -> eval-mode BN."""
    from maskformer.models.backbone import Conv2dFrozenBN, FoldedFrozenBatchNorm2d

    torch.manual_seed(0)
    reference = build_backbone(name, freeze_bn=False)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
    reference.eval()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(False)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    backbone = build_backbone(name)  # weights loaded after building: the folded convs must read them
    assert set(backbone.state_dict()) == set(state)
    backbone.load_state_dict(state)
    assert sum(type(m) is Conv2dFrozenBN for m in backbone.modules()) == folded
    assert sum(type(m) is FoldedFrozenBatchNorm2d for m in backbone.modules()) == folded
    assert not any(type(m) is nn.Conv2d for m in backbone.modules())

    x = torch.randn(2, 3, 64, 64)
    out, ref_out = backbone.train()(x), reference(x)
    loss, ref_loss = (sum((o * o.detach().sign()).mean() for o in outs.values()) for outs in (out, ref_out))
    loss.backward(), ref_loss.backward()
    for key in out:  # 33 residual blocks of random weights grow the activations: tolerance relative to the map
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-3, atol=1e-5 * ref_out[key].abs().max().item())
    ref_params = dict(reference.named_parameters())
    for param_name, param in backbone.named_parameters():
        ref_grad = ref_params[param_name].grad
        torch.testing.assert_close(param.grad, ref_grad, rtol=1e-3, atol=1e-5 * ref_grad.abs().max().item(),
                                   msg=param_name)


def test_frozen_bn_not_folded_outside_resnets():
    from maskformer.models.backbone import FrozenBatchNorm2d as FusedFrozenBatchNorm2d
    from maskformer.models.backbone import fold_frozen_batch_norm

    # A Sequential (conv, frozen BN) outside a ResNet is left alone, as are unfrozen BatchNorms in a ResNet.
    assert fold_frozen_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), FusedFrozenBatchNorm2d(4))) == 0
    assert fold_frozen_batch_norm(build_backbone("resnet18", freeze_bn=False).body) == 0


def test_resnet50_parameter_counts():
    frozen = build_backbone("resnet50.tv_in1k")
    assert sum(p.numel() for p in frozen.parameters()) == 23_454_912  # the original's convs-only count
    trainable_bn = build_backbone("resnet50", freeze_bn=False)
    assert sum(p.numel() for p in trainable_bn.parameters()) == 23_508_032  # HF's ResNetBackbone count
    assert any(isinstance(m, nn.BatchNorm2d) for m in trainable_bn.modules())


@pytest.fixture(scope="module")
def r101c() -> Backbone:
    return build_backbone("resnet101c")


def test_r101c_deep_stem_and_multigrid(r101c):
    body = r101c.body
    stem = [body.conv1[i] for i in (0, 3, 6)]
    assert [tuple(c.weight.shape) for c in stem] == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert [c.stride for c in stem] == [(2, 2), (1, 1), (1, 1)]
    assert isinstance(body.conv1[1], FrozenBatchNorm2d) and isinstance(body.bn1, FrozenBatchNorm2d)
    assert body.layer1[0].conv1.in_channels == 128
    assert [(b.conv2.dilation, b.conv2.padding) for b in body.layer4] == [((d, d), (d, d)) for d in (1, 2, 4)]
    assert body.layer4[0].conv2.stride == (2, 2)
    assert len(body.layer3) == 23
    out = check_interface(r101c, [256, 512, 1024, 2048], 64, 64)
    # The dilation is really used: undoing it changes res5 and nothing before it. (timm zero-initialises
    # each block's last BN, which would make the 3x3 convs invisible.)
    for m in r101c.body.layer4.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.fill_(1.0)
    x = torch.randn(2, 3, 64, 64)  # the size check_interface ran at: oneDNN reuses its kernels
    for b in r101c.body.layer4:
        b.conv2.dilation = b.conv2.padding = (1, 1)
    with torch.no_grad():
        plain = r101c(x)
        for b, d in zip(r101c.body.layer4, (1, 2, 4)):
            b.conv2.dilation = b.conv2.padding = (d, d)
        dilated = r101c(x)
    assert torch.equal(plain["res4"], dilated["res4"])
    assert not torch.allclose(plain["res5"], dilated["res5"])
    assert out["res5"].shape[-2:] == (2, 2)


def test_resnet101c_alias_is_not_timm_resnet101c():
    timm_c = timm.create_model("resnet101c", features_only=True, out_indices=(1,))
    assert timm_c.conv1[0].out_channels == 32  # why the alias maps to resnet101s instead


# ------------------------------------------------------------------------------------------------
# Generic timm models and errors
# ------------------------------------------------------------------------------------------------


def test_generic_timm_nchw():
    backbone = build_backbone("test_convnext")
    check_interface(backbone, list(backbone.body.feature_info.channels()), 64, 96)


def test_generic_timm_nhwc_is_permuted():
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=(64, 96))
    backbone = build_backbone("swin_s3_tiny_224", **kwargs)
    assert backbone.channels_last_output
    out = check_interface(backbone, [16, 32, 64, 128], 64, 96)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        raw = backbone.body(x)
        out = backbone(x)
    for nhwc, nchw in zip(raw, out.values()):
        assert torch.equal(nhwc.permute(0, 3, 1, 2), nchw)


def test_generic_timm_selects_strides_4_to_32():
    backbone = build_backbone("test_efficientnet")  # its feature list starts at stride 2
    assert backbone.feature_indices == [1, 2, 3, 4]
    check_interface(backbone, [24, 32, 48, 64], 64, 64)


def test_model_without_the_strides_is_rejected():
    with pytest.raises(ValueError, match=r"'test_vit' offers feature maps at strides \[16, 16, 16\]"):
        build_backbone("test_vit")


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5O'.*timm\.list_models"):
        build_backbone("resnet5O")


def test_swin_rejects_timm_kwargs():
    with pytest.raises(ValueError, match="img_size"):
        build_backbone("swin_tiny_patch4_window7_224", img_size=512)


# ------------------------------------------------------------------------------------------------
# Swin
# ------------------------------------------------------------------------------------------------


SMALL_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def small_swin(**config) -> Backbone:
    body = SwinTransformer(**{**SMALL_SWIN, **config})
    return Backbone(body, body.out_channels, name="small_swin")


def test_swin_tiny_layout_and_parameter_count():
    backbone = build_backbone("swin_tiny_patch4_window7_224", drop_path_rate=0.3)
    # HF's 27,522,234 minus its unused final LayerNorm (1,536).
    assert sum(p.numel() for p in backbone.parameters()) == 27_520_698
    assert backbone.out_channels == {"res2": 96, "res3": 192, "res4": 384, "res5": 768}
    # timm's weight layout: everything but the classifier and the final norm; plus the stage norms.
    ours = {k[len("body."):]: v.shape for k, v in backbone.state_dict().items()}
    classifier = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    expected = {k: v.shape for k, v in classifier.items() if not k.startswith(("head.", "norm."))}
    expected.update({f"norm{i}.{p}": torch.Size([96 * 2**i]) for i in range(4) for p in ("weight", "bias")})
    assert ours == expected
    # Drop path on both residual branches, linear over the 12 blocks up to 0.3, shift on odd blocks.
    blocks = [b for stage in backbone.body.layers for b in stage.blocks]
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 12).tolist())
    assert [getattr(b.drop_path2, "drop_prob", 0.0) for b in blocks] == rates
    assert [b.attn.shift_size for b in blocks] == [0, 3] * 6


def test_swin_variants_match_timm():
    for name, architecture in SWIN_VARIANTS.items():
        with torch.device("meta"):  # no memory, no init cost
            reference = timm.create_model(name)
        assert architecture == dict(
            embed_dim=reference.embed_dim,
            depths=tuple(len(stage.blocks) for stage in reference.layers),
            num_heads=tuple(stage.blocks[0].attn.num_heads for stage in reference.layers),
            window_size=reference.layers[0].blocks[0].attn.window_size[0],
        ), name


def test_swin_any_size_and_small_maps():
    backbone = small_swin()
    for height, width in [(64, 96), (32, 32), (480, 640)]:
        check_interface(backbone, [32, 64, 128, 256], height, width)
    # Stage 4 (1x1 at 32x32) stays shifted with the full window: only padding, never a smaller window.
    assert all(b.attn.window_size == 7 for s in backbone.body.layers for b in s.blocks)


def test_window_layout_matches_pad_roll_partition():
    torch.manual_seed(0)
    height, width, ws, shift = 10, 13, 7, 3
    x = torch.randn(2, height, width, 5)
    padded = F.pad(x, (0, 0, 0, 14 - width, 0, 14 - height))
    expected = window_partition(torch.roll(padded, (-shift, -shift), (1, 2)), ws)
    layout = window_layout(height, width, ws, shift, x.device)
    windows = x.reshape(2, -1, 5).index_select(1, layout.gather)
    windows.index_fill_(1, layout.padding, 0.0)
    assert torch.equal(windows.view(-1, ws * ws, 5), expected)
    assert torch.equal(windows.index_select(1, layout.scatter).view_as(x), x)
    assert layout.mask.shape == (4, 1, 49, 49)
    assert set(layout.mask.unique().tolist()) == {0.0, -100.0}
    assert not layout.mask[0].any()  # the top-left window is not split by the shift
    assert window_layout(14, 14, ws, 0, x.device).mask is None
    assert window_layout(14, 14, ws, 0, x.device).padding is None


def test_swin_trains_after_inference_mode():
    backbone = small_swin(drop_path_rate=0.2)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        backbone.eval()(x)  # fills the layout cache inside inference mode
    backbone.train()
    sum(f.sum() for f in backbone(x).values()).backward()
    assert backbone.body.patch_embed.proj.weight.grad is not None


def test_swin_bf16_autocast_and_export():
    torch.manual_seed(0)
    backbone = small_swin().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        reference = backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = backbone(x)
    for name in reference:
        assert low[name].dtype == torch.bfloat16
        torch.testing.assert_close(low[name].float(), reference[name], rtol=0.1, atol=0.1)
    exported = torch.export.export(backbone, (x,)).module()
    with torch.no_grad():
        for name, feature in exported(x).items():
            torch.testing.assert_close(feature, reference[name])


def hf_swin(seed: int = 0, **config):
    """A Hugging Face MaskFormerSwinBackbone (the independent reference) with random, non-default weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.MaskFormerSwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **config)
    model = transformers.MaskFormerSwinBackbone(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2 if "relative_position" in name else 0.05)
    return model


def swin_like(hf_model, **config) -> Backbone:
    body = SwinTransformer(**config)
    backbone = Backbone(body, body.out_channels).eval()
    backbone.load_state_dict(swin_hf_to_ours(hf_model.state_dict()), strict=True)
    return backbone


def max_diff_to_hf(hf_model, backbone, x) -> float:
    with torch.no_grad():
        expected = hf_model(x).feature_maps
        got = list(backbone(x).values())
    assert [e.shape for e in expected] == [g.shape for g in got]
    return max((e - g).abs().max().item() for e, g in zip(expected, got))


SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)


def test_swin_tiny_equals_hf_at_512():
    hf = hf_swin(**SWIN_T)
    ours = swin_like(hf, **SWIN_T)
    # 512/4 = 128 is not a multiple of 7: every stage pads.
    assert max_diff_to_hf(hf, ours, torch.randn(1, 3, 512, 512)) < 1e-4


@pytest.mark.parametrize(
    "window_size,sizes", [(7, [(384, 640), (512, 512)]), (12, [(192, 256), (64, 96)])]
)
def test_small_swin_equals_hf(window_size, sizes):
    config = dict(embed_dim=32, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8), window_size=window_size)
    hf = hf_swin(seed=window_size, **config)
    ours = swin_like(hf, **config)
    for height, width in sizes:
        assert max_diff_to_hf(hf, ours, torch.randn(2, 3, height, width)) < 1e-4, (height, width)


def test_small_swin_gradients_equal_hf():
    # Padding slots get the qkv bias instead of being projected: the bias must still get their gradient.
    hf = hf_swin(**SMALL_SWIN)
    ours = swin_like(hf, **SMALL_SWIN)
    x = torch.randn(2, 3, 96, 160)
    weights = [torch.randn(2, 32 * 2**i, 96 // 4 // 2**i, 160 // 4 // 2**i) for i in range(4)]
    sum((f * w).sum() for f, w in zip(hf(x).feature_maps, weights)).backward()
    sum((f * w).sum() for f, w in zip(ours(x).values(), weights)).backward()
    for stage in range(4):
        hf_attn = hf.model.encoder.layers[stage].blocks[1].attention.self
        our_attn = ours.body.layers[stage].blocks[1].attn
        hf_grad = torch.cat([hf_attn.query.bias.grad, hf_attn.key.bias.grad, hf_attn.value.bias.grad])
        torch.testing.assert_close(our_attn.qkv.bias.grad, hf_grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            our_attn.relative_position_bias_table.grad, hf_attn.relative_position_bias_table.grad, rtol=1e-4, atol=1e-4
        )
    torch.testing.assert_close(
        ours.body.patch_embed.proj.weight.grad, hf.model.embeddings.patch_embeddings.projection.weight.grad,
        rtol=1e-4, atol=1e-3,
    )


def test_swin_hf_key_map_errors():
    state = hf_swin(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)).state_dict()
    partial = {k: v for k, v in state.items() if ".attention.self.key." not in k}
    with pytest.raises(KeyError, match=r"query/key/value incomplete.*layers\.0\.blocks\.0\.attn\.qkv\.weight"):
        swin_hf_to_ours(partial)
    with pytest.raises(KeyError, match=r"cannot map 1 key\(s\): model\.embeddings\.position_embeddings"):
        swin_hf_to_ours({**state, "model.embeddings.position_embeddings": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------
# Key maps from the official / detectron2 layouts (inputs written here by hand)
# ------------------------------------------------------------------------------------------------


def to_official_swin(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> the official MaskFormer Swin names, with the buffers the official files carry."""
    official = {}
    for key, value in ours.items():
        key = key.removeprefix("body.")
        match = re.fullmatch(r"layers\.(\d)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match[1]) - 1}.downsample.{match[2]}"
        official[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            official[key.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    return official


def test_swin_official_keys_round_trip():
    ours = small_swin().state_dict()
    official = to_official_swin(ours)
    assert "layers.0.downsample.reduction.weight" in official and "layers.3.downsample.norm.bias" not in official
    assert swin_official_to_ours(official) == ours
    # An ImageNet file: its final norm, head and attn_mask buffers are dropped; its stage norms are absent.
    imagenet = {k: v for k, v in official.items() if not re.match(r"norm\d", k)}
    imagenet.update({"norm.weight": torch.ones(256), "head.weight": torch.zeros(10, 256),
                     "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    assert swin_official_to_ours(imagenet) == {k: v for k, v in ours.items() if not re.match(r"body\.norm\d", k)}
    with pytest.raises(KeyError, match="absolute_pos_embed"):
        swin_official_to_ours({**official, "absolute_pos_embed": torch.zeros(1)})


def to_d2_resnet(ours: dict[str, torch.Tensor], deep_stem: bool) -> dict[str, torch.Tensor]:
    """Our (timm) ResNet keys -> detectron2 names, as MaskFormer's checkpoints have them."""
    stem = (
        {"conv1.0": "stem.conv1", "conv1.1": "stem.conv1.norm", "conv1.3": "stem.conv2", "conv1.4": "stem.conv2.norm",
         "conv1.6": "stem.conv3", "bn1": "stem.conv3.norm"}
        if deep_stem
        else {"conv1": "stem.conv1", "bn1": "stem.conv1.norm"}
    )
    d2 = {}
    for key, value in ours.items():
        module, _, tensor = key.removeprefix("body.").rpartition(".")
        if module in stem:
            module = stem[module]
        else:
            layer, block, rest = module.split(".", 2)
            rest = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(rest, rest)
            rest = re.sub(r"bn(\d)", r"conv\1.norm", rest)
            module = f"res{int(layer.removeprefix('layer')) + 1}.{block}.{rest}"
        d2[f"{module}.{tensor}"] = value
    return d2


def test_resnet_d2_keys_round_trip(resnet18, r101c):
    for backbone, deep in ((resnet18, False), (r101c, True)):
        ours = backbone.state_dict()
        d2 = to_d2_resnet(ours, deep_stem=deep)
        assert "res2.0.conv1.norm.running_var" in d2 and "res3.0.shortcut.weight" in d2
        assert ("stem.conv3.weight" in d2) == deep
        assert resnet_d2_to_ours({**d2, "stem.fc.weight": torch.zeros(1)}) == ours
    with pytest.raises(KeyError, match=r"cannot map 2 key\(s\): res6\.0\.conv1\.weight, stem\.conv4\.weight"):
        resnet_d2_to_ours({**d2, "res6.0.conv1.weight": torch.zeros(1), "stem.conv4.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------
# pretrained="path"
# ------------------------------------------------------------------------------------------------


def test_pretrained_file_timm_layout_round_trip(tmp_path):
    torch.manual_seed(3)
    classifier = timm.create_model("resnet18")  # random weights, with its fc head
    with torch.no_grad():  # non-default BN statistics, so that loading them is visible
        for m in classifier.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.eval().forward_intermediates(x, indices=(1, 2, 3, 4), intermediates_only=True)
    for i, wrap in enumerate([lambda sd: sd, lambda sd: {"model": sd}, lambda sd: {"state_dict": sd, "epoch": 3}]):
        path = tmp_path / f"resnet18_{i}.pth"
        torch.save(wrap(classifier.state_dict()), path)
        backbone = build_backbone("resnet18", pretrained=str(path)).eval()
        with torch.no_grad():
            got = list(backbone(x).values())
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_pretrained_file_other_layouts(tmp_path, resnet18):
    # Swin: a timm classifier file (stage norms absent), the official layout and the HF layout.
    config = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=7)
    classifier = timm.create_model("swin_tiny_patch4_window7_224", **config)
    torch.save(classifier.state_dict(), tmp_path / "timm_swin.pth")
    backbone = small_swin(**config)
    load_backbone_weights(backbone, tmp_path / "timm_swin.pth")
    torch.testing.assert_close(backbone.body.layers[1].downsample.reduction.weight,
                               classifier.layers[1].downsample.reduction.weight)

    source = small_swin(**config)
    with torch.no_grad():
        source.body.norm2.weight.fill_(3.0)
    torch.save({"model": to_official_swin(source.state_dict())}, tmp_path / "official_swin.pth")
    hf = hf_swin(**config)
    torch.save(hf.state_dict(), tmp_path / "hf_swin.pth")
    full_hf = {f"model.pixel_level_module.encoder.{k}": v for k, v in hf.state_dict().items()}
    full_hf["model.transformer_module.queries_embedder.weight"] = torch.zeros(100, 256)
    torch.save(full_hf, tmp_path / "hf_maskformer.pth")
    hf_reference = swin_like(hf, **config)
    references = {"official_swin.pth": source, "hf_swin.pth": hf_reference, "hf_maskformer.pth": hf_reference}
    for path, reference in ((tmp_path / name, model) for name, model in references.items()):
        backbone = small_swin(**config)
        load_backbone_weights(backbone, path)
        for key, value in reference.state_dict().items():
            assert torch.equal(backbone.state_dict()[key], value), (path.name, key)

    # ResNet: a detectron2-layout file under "model", and a full-model checkpoint with backbone.* keys.
    d2 = to_d2_resnet(resnet18.state_dict(), deep_stem=False)
    torch.save({"model": d2, "__author__": "test"}, tmp_path / "d2.pth")
    full = {f"backbone.{k}": v for k, v in resnet18.state_dict().items()}
    full["sem_seg_head.predictor.query_embed.weight"] = torch.zeros(100, 256)
    torch.save(full, tmp_path / "full.pth")
    for name in ("d2.pth", "full.pth"):
        backbone = build_backbone("resnet18", pretrained=tmp_path / name)
        for key, value in resnet18.state_dict().items():
            assert torch.equal(backbone.state_dict()[key], value), (name, key)


def test_pretrained_file_errors(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    wrong = dict(state)
    del wrong["layer1.0.conv1.weight"]
    wrong["layer9.extra"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(wrong, path)
    with pytest.raises(ValueError) as error:
        build_backbone("resnet18", pretrained=str(path))
    message = str(error.value)
    assert str(path) in message and "'resnet18'" in message
    assert "missing keys (1): layer1.0.conv1.weight" in message
    assert "unexpected keys (1): layer9.extra" in message
    assert "fc.weight" not in message  # the classifier head is ignored

    resnet34 = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), resnet34)
    with pytest.raises(ValueError, match=r"missing keys \(85\): layer1\.0\.bn3\.bias.*shape mismatches \(31\)"):
        build_backbone("resnet50", pretrained=resnet34)

    shapes = tmp_path / "shapes.pth"
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, shapes)
    expected = r"shape mismatches \(1\): conv1\.weight \(file \[64, 3, 3, 3\], model \[64, 3, 7, 7\]\)"
    with pytest.raises(ValueError, match=expected):
        build_backbone("resnet18", pretrained=shapes)

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pkl: cannot read a torch state dict"):
        build_backbone("resnet18", pretrained=str(garbage))


def test_dilated_resnet_keeps_a_finer_res5_grid():
    backbone = build_backbone("resnet18", freeze_bn=False, output_stride=16)
    assert backbone.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 16}
    feats = backbone(torch.randn(1, 3, 64, 96))
    assert feats["res5"].shape[-2:] == (4, 6) and feats["res4"].shape[-2:] == (4, 6)
    assert feats["res5"].shape[1] == 512
    eight = build_backbone("resnet18", freeze_bn=False, output_stride=8)
    assert eight.out_strides == {"res2": 4, "res3": 8, "res4": 8, "res5": 8}
    assert eight(torch.randn(1, 3, 64, 64))["res5"].shape[-2:] == (8, 8)


def test_grad_checkpointing_keeps_outputs_and_gradients():
    from maskformer.models.swin import SwinTransformer

    torch.manual_seed(0)
    swin = Backbone(SwinTransformer(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), drop_path_rate=0.3),
                    [24, 48, 96, 192], name="tiny swin").train()
    x = torch.randn(2, 3, 64, 96)

    def run():
        swin.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws; the recomputation must reproduce them
        out = swin(x)
        sum(o.square().mean() for o in out.values()).backward()
        return out, [p.grad.clone() for p in swin.parameters()]

    plain_out, plain_grads = run()
    swin.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in swin.body.layers)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out, grads = run()
    for name in out:
        torch.testing.assert_close(out[name], plain_out[name], rtol=0, atol=0)
    for g, ref in zip(grads, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-7)
    swin.set_grad_checkpointing(False)
    plain_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t.numel()) or t, lambda t: t):
        run()
    assert sum(saved) < 0.5 * sum(plain_saved)  # what backward keeps alive shrinks
    cfg_model = build_backbone("resnet18")
    cfg_model.set_grad_checkpointing(True)
    assert cfg_model.body.grad_checkpointing
