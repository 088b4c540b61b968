"""Checkpoint interop: official (detectron2) and Hugging Face MaskFormer weights, ImageNet backbones,
the restricted unpickler, the converter tool, and post-processing against the original algorithm.

The official checkpoints are synthesised from our own randomised models through an inverse key map
written here (independently of ``maskformer.interop``); the Hugging Face models are built with random
weights from ``transformers`` configs (no download) and are the independent numerical reference.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
import pickletools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from maskformer.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from maskformer.config import config_from_dict
from maskformer.inference import panoptic_inference, postprocess
from maskformer.interop import UnsafePickleError, convert, detect_layout, load_pickle, read_source
from maskformer.models.backbone import Backbone, build_backbone
from maskformer.models.build import build_maskformer, build_model, build_pixel_decoder, build_predictor
from maskformer.models.maskformer import MaskFormer
from maskformer.models.swin import SwinTransformer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", ROOT / "tools" / "convert_checkpoint.py")
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
convert_main = _tool.main
SWIN_T_ADE_CONFIG = str(ROOT / "configs" / "ade20k-150" / "swin" / "maskformer_swin_tiny_bs16_160k.yaml")

SMALL_HEAD = ["model.hidden_dim=32", "model.conv_dim=32", "model.mask_dim=32", "model.nheads=4",
              "model.dim_feedforward=64", "model.num_queries=8", "model.dec_layers=2",
              "model.pixel_decoder_enc_layers=2", "model.backbone.pretrained=false"]
ENC = ["model.pixel_decoder=transformer_encoder_fpn", "model.transformer_in_feature=transformer_encoder"]
SWIN_T = "swin_tiny_patch4_window7_224"


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    # Randomised FrozenBN ResNets produce subnormal floats, which make CPU convolutions ~20x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def small_config(backbone: str, *extra: str, num_classes: int = 5):
    return config_from_dict({}, SMALL_HEAD + [f"model.backbone.name={backbone}", f"model.num_classes={num_classes}",
                                             *extra])


def write_config(path: Path, backbone: str, num_classes: int = 5) -> str:
    """A YAML config of ``small_config(backbone)`` (pretrained on, as the original configs have it)."""
    lines = [f"model:", f"  backbone: {{name: {backbone}, pretrained: true}}", f"  num_classes: {num_classes}"]
    lines += [f"  {o.split('.', 1)[1].replace('=', ': ')}" for o in SMALL_HEAD if "backbone" not in o]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every weight and statistic away from its init, so that any swapped or mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * t[0].numel() ** -0.5)
    return model


def run(model: nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model.eval()(x)
    return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}


# ------------------------------------------------------------------------------------------------
# Our layout -> the official (detectron2) layout, written independently of maskformer.interop
# ------------------------------------------------------------------------------------------------


def _official_backbone_key(key: str, deep_stem: bool) -> str:
    parts = key.split(".")
    if parts[0] == "layers":  # Swin: our downsample opens stage i, the original's closes stage i-1
        if parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        return ".".join(parts)
    if parts[0] == "patch_embed" or parts[0].startswith("norm"):
        return key
    if parts[0] == "conv1" and deep_stem:  # timm's deep stem conv1.{0,1,3,4,6} -> stem.conv{1,2,3}[.norm]
        index, tensor = parts[1], parts[2]
        return {"0": "stem.conv1.", "1": "stem.conv1.norm.", "3": "stem.conv2.", "4": "stem.conv2.norm.",
                "6": "stem.conv3."}[index] + tensor
    if parts[0] == "conv1":
        return "stem.conv1." + parts[1]
    if parts[0] == "bn1":
        return ("stem.conv3.norm." if deep_stem else "stem.conv1.norm.") + parts[1]
    stage = "res" + str(int(parts[0][len("layer"):]) + 1)
    block, module, rest = parts[1], parts[2], parts[3:]
    if module.startswith("bn"):
        module = f"conv{module[2:]}.norm"
    elif module == "downsample":
        module, rest = ("shortcut" if rest[0] == "0" else "shortcut.norm"), rest[1:]
    return ".".join([stage, block, module, *rest])


def to_official(state_dict: dict, *, v1: bool, window_size: int | None = None, module_prefix: bool = False,
                protocol_extras: bool = True) -> dict:
    """Our MaskFormer state dict -> an official model-zoo state dict of numpy arrays (v1 or v2 head names)."""
    deep_stem = "backbone.body.conv1.0.weight" in state_dict
    head = "sem_seg_head." if v1 else "sem_seg_head.pixel_decoder."
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone.body."):
            new = "backbone." + _official_backbone_key(key[len("backbone.body."):], deep_stem)
        elif key.startswith("pixel_decoder.transformer.layers."):
            new = head + "transformer.encoder.layers." + key[len("pixel_decoder.transformer.layers."):]
        elif key.startswith("pixel_decoder."):
            new = head + key[len("pixel_decoder."):]
        elif key.startswith("predictor.decoder."):
            new = "sem_seg_head.predictor.transformer.decoder." + key[len("predictor.decoder."):]
            new = new.replace(".cross_attn.", ".multihead_attn.")
        else:
            assert key.startswith("predictor."), key
            new = "sem_seg_head." + key
        out[new] = value.numpy().copy()
    if window_size is not None:  # the original's persistent buffers, which a conversion must drop
        for key in list(out):
            if key.endswith("attn.relative_position_bias_table"):
                out[key.replace("relative_position_bias_table", "relative_position_index")] = np.zeros(
                    (window_size**2, window_size**2), dtype=np.int64)
    if protocol_extras:
        num_classes = state_dict["predictor.class_embed.weight"].shape[0]
        out["criterion.empty_weight"] = np.r_[np.ones(num_classes - 1), 0.1].astype(np.float32)
        out["pixel_mean"] = np.array([123.675, 116.28, 103.53], dtype=np.float32).reshape(3, 1, 1)
    if module_prefix:
        out = {"module." + k: v for k, v in out.items()}
    return out


def write_pkl(path, weights: dict, protocol: int = pickle.DEFAULT_PROTOCOL) -> str:
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "maskformer-test"}, f, protocol=protocol)
    return str(path)


def assert_same_weights(expected: dict, got: dict) -> None:
    assert set(got) == set(expected)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different[:5]


# Source models (built once per module): the official combinations of backbone and pixel decoder.
SOURCE_SPECS = {
    "r50-fpn": ("resnet50", [], 150),  # ADE20K semantic
    "r50-6enc": ("resnet50", ENC, 133),  # COCO panoptic "R50 + 6 Enc"
    "swinT-fpn": (SWIN_T, [], 133),  # COCO panoptic Swin-T
}
X = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def official_source():
    """name -> (config, randomised model, its state dict, its outputs on X) for ``SOURCE_SPECS[name]``."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            backbone, extra, num_classes = SOURCE_SPECS[name]
            cfg = small_config(backbone, *extra, num_classes=num_classes)
            model = randomize_(build_maskformer(cfg), seed=len(cache)).eval()
            reference = run(model, X)
            assert torch.isfinite(reference["pred_masks"]).all()
            cache[name] = (cfg, model, model.state_dict(), reference)
        return cache[name]

    yield get
    cache.clear()


OFFICIAL_CASES = {
    # id: (source, v1 head names, DataParallel prefix, pickle protocol)
    "r50-fpn-v1": ("r50-fpn", True, False, 4),
    "r50-6enc-v2": ("r50-6enc", False, True, 4),
    "swinT-fpn-v2": ("swinT-fpn", False, False, 5),
    "swinT-fpn-v1": ("swinT-fpn", True, False, 4),
}


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_official_pkl_converts_to_identical_model(tmp_path, official_source, case):
    name, v1, module_prefix, protocol = OFFICIAL_CASES[case]
    cfg, _, expected, reference = official_source(name)
    swin = name.startswith("swin")
    pkl = write_pkl(tmp_path / "model_final.pkl", to_official(expected, v1=v1, window_size=7 if swin else None,
                                                              module_prefix=module_prefix), protocol)
    # Converted on the fly by build_model: every tensor lands where it came from, outputs are identical.
    model = build_model(cfg, weights=pkl)
    assert_same_weights(expected, model.state_dict())
    got = run(model, X)
    assert torch.equal(got["pred_logits"], reference["pred_logits"])
    assert torch.equal(got["pred_masks"], reference["pred_masks"])
    del model

    converted, _ = convert(pkl)  # no config: checked against a model of the detected architecture
    assert converted.source_layout == f"official MaskFormer ({'v1' if v1 else 'v2'} head names)"
    facts = converted.facts
    assert facts["num_classes"] == SOURCE_SPECS[name][2]
    assert (facts["num_queries"], facts["dec_layers"], facts["hidden_dim"], facts["dim_feedforward"]) == (8, 2, 32, 64)
    enc = "6enc" in name
    assert facts["pixel_decoder"] == ("transformer_encoder_fpn" if enc else "fpn")
    assert facts["pixel_decoder_enc_layers"] == (2 if enc else 0)
    assert facts["transformer_in_feature"] == ("transformer_encoder" if enc else "res5")
    assert facts["backbone"]["label"] == ("Swin-T" if swin else "ResNet-50")
    if swin:
        assert facts["backbone"]["window_size"] == 7 and facts["backbone"]["num_heads"] == [3, 6, 12, 24]
    else:
        assert facts["backbone"]["depths"] == [3, 4, 6, 3]


def test_converter_output_loads_back(tmp_path, official_source):
    cfg, _, expected, reference = official_source("r50-fpn")
    pkl = write_pkl(tmp_path / "model_final.pkl", to_official(expected, v1=True))
    out = tmp_path / "converted.pth"
    assert convert_main([pkl, str(out)]) == 0
    stored = load_checkpoint(out)
    assert stored["format"] == "maskformer/1" and stored["detected"]["num_classes"] == 150
    assert stored["source"] == "model_final.pkl" and "config" not in stored
    model = build_model(cfg, weights=out)
    assert_same_weights(expected, model.state_dict())
    assert torch.equal(run(model, X)["pred_masks"], reference["pred_masks"])


@pytest.mark.slow
def test_official_r101c_deep_stem(tmp_path):
    cfg = small_config("resnet101c")
    source = randomize_(build_maskformer(cfg), seed=3)
    official = to_official(source.state_dict(), v1=False)
    assert official["backbone.stem.conv2.weight"].shape == (64, 64, 3, 3)
    assert official["backbone.res2.0.conv1.weight"].shape[1] == 128
    pkl = write_pkl(tmp_path / "r101c.pkl", official)
    converted, _ = convert(pkl)
    assert converted.facts["backbone"]["name"] == "resnet101c"
    model = build_model(cfg, weights=pkl)
    assert_same_weights(source.state_dict(), model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(run(model, x)["pred_masks"], run(source, x)["pred_masks"])


# ------------------------------------------------------------------------------------------------
# Errors of the official path and the converter tool
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swin_coco_pkl(tmp_path_factory, official_source):
    """The Swin-T source model with 133 classes (COCO panoptic) in the official layout, v2 names."""
    weights = to_official(official_source("swinT-fpn")[2], v1=False, window_size=7)
    return weights, write_pkl(tmp_path_factory.mktemp("swin") / "swin_coco.pkl", weights)


def test_wrong_classes_and_backbone_are_named(swin_coco_pkl, tmp_path):
    _, pkl = swin_coco_pkl
    cfg = small_config("resnet50", num_classes=150)
    with pytest.raises(CheckpointError) as err:
        convert(pkl, cfg)
    assert "checkpoint has 133 classes and a Swin-T backbone, config says 150 classes and resnet50" in str(err.value)
    with pytest.raises(CheckpointError, match="checkpoint has 133 classes and a Swin-T backbone, config says "
                                              "150 classes and swin_tiny"):
        build_model(small_config(SWIN_T, num_classes=150), weights=pkl)
    # The sizes the weights fix are compared too.
    with pytest.raises(CheckpointError, match="num_queries: checkpoint 8, config 9"):
        convert(pkl, small_config(SWIN_T, "model.num_queries=9", num_classes=133))


def test_missing_unexpected_and_misshaped_keys_are_named(swin_coco_pkl, tmp_path):
    weights, _ = swin_coco_pkl
    cfg = small_config(SWIN_T, num_classes=133)

    missing = dict(weights)
    del missing["sem_seg_head.predictor.transformer.decoder.layers.1.linear2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n  predictor\.decoder\.layers\.1\.linear2\.bias"):
        convert(write_pkl(tmp_path / "missing.pkl", missing), cfg)

    unexpected = dict(weights, **{"sem_seg_head.predictor.extra_head.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected key.*sem_seg_head\.predictor\.extra_head\.weight"):
        convert(write_pkl(tmp_path / "unexpected.pkl", unexpected), cfg)

    misshaped = dict(weights)
    misshaped["sem_seg_head.predictor.mask_embed.layers.1.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*\n  predictor\.mask_embed\.layers\.1\.weight: "
                                              r"checkpoint \(32, 16\) vs model \(32, 32\)"):
        build_model(cfg, weights=write_pkl(tmp_path / "misshaped.pkl", misshaped))
    # Without a config the same problems are found against the detected architecture.
    with pytest.raises(CheckpointError, match=r"missing keys \(1\)"):
        convert(str(tmp_path / "missing.pkl"))


def test_converter_tool(swin_coco_pkl, tmp_path, capsys):
    _, pkl = swin_coco_pkl
    out = tmp_path / "out.pth"
    config = write_config(tmp_path / "swin_coco.yaml", "swin_tiny_patch4_window7_224.ms_in1k", num_classes=133)
    assert convert_main([pkl, str(out), "--config", config]) == 0
    printed = capsys.readouterr().out
    assert "Swin-T [swin_tiny_patch4_window7_224]" in printed and "133 (+1 no-object)" in printed
    stored = load_checkpoint(out)
    assert stored["config"]["model"]["num_classes"] == 133
    assert stored["config"]["model"]["backbone"]["pretrained"] is False  # the file holds every weight
    model = build_model(config, weights=out)
    assert model.num_classes == 133

    assert convert_main([pkl, str(tmp_path / "bad.pth"), "--config", config, "model.num_classes=150"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint has 133 classes and a Swin-T backbone, config says 150 classes" in err
    assert not (tmp_path / "bad.pth").exists()
    assert convert_main([pkl, str(tmp_path / "x.pth"), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert convert_main([pkl, str(tmp_path / "x.pth"), "--config", "maskformer_swin_tiny_ade2k"]) == 2
    assert "did you mean 'maskformer_swin_tiny_ade20k'" in capsys.readouterr().err


def test_other_layout_errors(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="cannot tell what these weights are"):
        convert(tmp_path / "unknown.pth")
    torch.save({"pixel_level_module.decoder.mask_projection.weight": torch.zeros(1)}, tmp_path / "hf_base.pth")
    with pytest.raises(CheckpointError, match="without the class and mask heads"):
        convert(tmp_path / "hf_base.pth")
    write_pkl(tmp_path / "msra.pkl", {"res2_0_branch2a_w": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match="Caffe2-style"):
        convert(tmp_path / "msra.pkl")
    write_pkl(tmp_path / "partial.pkl", {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
                                         "sem_seg_head.predictor.weight": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match="architecture cannot be detected.*give the config"):
        convert(tmp_path / "partial.pkl")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        convert(tmp_path / "absent.pkl")
    (tmp_path / "truncated.pkl").write_bytes(pickle.dumps({"model": {}})[:-3])
    with pytest.raises(CheckpointError, match="cannot unpickle"):
        load_pickle(tmp_path / "truncated.pkl")


# ------------------------------------------------------------------------------------------------
# The restricted unpickler
# ------------------------------------------------------------------------------------------------


class _RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_malicious_pickle_is_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model_final{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2, np.float32), "x": _RunsACommand(f"touch {marker}")},
                     "__author__": "x"}, f, protocol=2)
    system = f"{os.system.__module__}.system"  # posix.system on Linux: what the pickle names
    with pytest.raises(UnsafePickleError, match=system.replace(".", r"\.")):
        load_pickle(path)
    with pytest.raises(CheckpointError, match="system"):
        build_model(small_config("resnet18"), weights=path)
    with pytest.raises(CheckpointError, match="system"):
        convert(path)
    assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
    class CallsEval:
        def __reduce__(self):
            return eval, ("1 + 1",)

    path = tmp_path / "eval.pkl"
    path.write_bytes(pickle.dumps({"model": CallsEval()}))
    with pytest.raises(UnsafePickleError, match=r"'builtins\.eval'"):
        load_pickle(path)
    path.write_bytes(pickle.dumps({"model": {"w": torch.zeros(2)}}))  # a torch tensor is not a numpy array
    with pytest.raises(UnsafePickleError, match=r"torch\._utils\._rebuild_tensor_v2"):
        load_pickle(path)


def test_numpy_pickles_of_every_protocol_and_numpy_2_names(tmp_path):
    from collections import OrderedDict

    weights = OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.float64(2.5),
                          c=np.array([1, 2], dtype=np.int64))
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": weights, "__author__": "t", "matching_heuristics": True},
                                      protocol=protocol))
        loaded = load_pickle(path)
        assert loaded["matching_heuristics"] is True and isinstance(loaded["model"], OrderedDict)
        np.testing.assert_array_equal(loaded["model"]["a"], weights["a"])
        assert loaded["model"]["b"] == 2.5
    # numpy 2 writes numpy._core...: the same reconstructors, whatever numpy is installed.
    text = pickle.dumps({"model": weights}, protocol=0)
    assert b"numpy.core.multiarray" in text
    path = tmp_path / "numpy2.pkl"
    path.write_bytes(text.replace(b"numpy.core.multiarray", b"numpy._core.multiarray"))
    globals_named = {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}
    assert "numpy._core.multiarray _reconstruct" in globals_named
    np.testing.assert_array_equal(load_pickle(path)["model"]["a"], weights["a"])
    source = read_source(path)
    assert source.file_format == "pickle" and source.state_dict["a"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Hugging Face MaskFormer: numerical equality
# ------------------------------------------------------------------------------------------------


def hf_maskformer(backbone_config, *, hidden: int, num_labels: int, queries: int, layers: int, ffn: int,
                  heads: int = 8, seed: int = 0):
    """A randomised ``MaskFormerForInstanceSegmentation`` (eval mode) with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    cfg = transformers.MaskFormerConfig(
        backbone_config=backbone_config, fpn_feature_size=hidden, mask_feature_size=hidden, num_labels=num_labels,
        decoder_config=dict(model_type="detr", d_model=hidden, decoder_layers=layers, decoder_attention_heads=heads,
                            decoder_ffn_dim=ffn, num_queries=queries, encoder_layers=1))
    model = transformers.MaskFormerForInstanceSegmentation(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm / GroupNorm / BatchNorm scales
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0, 0.1)
            elif "relative_position_bias_table" in name:
                p.normal_(0, 0.3)
            elif "queries_embedder" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
        batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in batch_norms:
            m.weight.uniform_(0.25, 0.75)
        for m in model.modules():
            if hasattr(m, "shortcut") and hasattr(m, "layer"):
                # A random ReLU network amplifies float32 rounding (and any input change) at every block;
                # small scales on each residual branch's last norm, as trained ResNets have, keep it
                # well-conditioned, so that 1e-4 measures the mapping and not the conditioning.
                m.layer[-1].normalization.weight.uniform_(0.05, 0.25)
        model.model.pixel_level_module.decoder.mask_projection.weight.mul_(0.5)  # mask logits of about +-10
        # Confident, query-dependent class scores, mostly for real classes, so that panoptic has segments.
        model.class_predictor.weight.mul_(3.0)
        model.class_predictor.bias[-1] = -2.0
        if batch_norms:
            # Statistics of real activations (cumulative over one batch), then perturbed: FrozenBN must use them.
            for m in batch_norms:
                m.reset_running_stats()
                m.momentum = None
            model.model.pixel_level_module.encoder.train()(torch.randn(2, 3, 128, 128))
            for m in batch_norms:
                m.running_mean.add_(torch.randn_like(m.running_mean) * 0.05)
                m.running_var.mul_(torch.rand_like(m.running_var) * 0.4 + 0.8)
    return model.eval()


def hf_outputs(model, x: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model(pixel_values=x)
    return {"pred_logits": out.class_queries_logits, "pred_masks": out.masks_queries_logits}


def our_overrides(hidden: int, num_labels: int, queries: int, layers: int, ffn: int, heads: int = 8) -> list[str]:
    return [f"model.hidden_dim={hidden}", f"model.conv_dim={hidden}", f"model.mask_dim={hidden}",
            f"model.num_classes={num_labels}", f"model.num_queries={queries}", f"model.dec_layers={layers}",
            f"model.dim_feedforward={ffn}", f"model.nheads={heads}", "model.backbone.pretrained=false"]


def max_differences(ours: dict, theirs: dict) -> tuple[float, float]:
    for key in ("pred_logits", "pred_masks"):
        assert ours[key].shape == theirs[key].shape, key
    return ((ours["pred_logits"] - theirs["pred_logits"]).abs().max().item(),
            (ours["pred_masks"] - theirs["pred_masks"]).abs().max().item())


SMALL_HF = dict(hidden=64, num_labels=5, queries=10, layers=2, ffn=128, heads=4)
STAGES = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(scope="module")
def small_hf_resnet(tmp_path_factory):
    """A small HF ResNet (bottleneck blocks, one a stage; stage 1 widens 64 -> 128, so it has a shortcut
    projection) MaskFormer, saved with save_pretrained."""
    backbone = transformers.ResNetConfig(hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 1, 1],
                                         layer_type="bottleneck", out_features=STAGES)
    model = hf_maskformer(backbone, seed=1, **SMALL_HF)
    folder = tmp_path_factory.mktemp("hf_resnet")
    model.save_pretrained(folder)
    ours = build_model(small_resnet_config(), weights=folder)
    return model, folder, ours


def small_resnet_config():
    """timm's ResNet with the HF fixture's architecture (bottleneck widths 32..256 expand to 128..1024)."""
    return config_from_dict({}, our_overrides(**SMALL_HF) + [
        "model.backbone.name=resnet26", "model.backbone.kwargs={layers: [1, 1, 1, 1], channels: [32, 64, 128, 256]}"])


def small_swin_maskformer() -> MaskFormer:
    """Our model with a small Swin (no timm name describes it, so it is assembled by hand)."""
    cfg = config_from_dict({}, our_overrides(**SMALL_HF))
    body = SwinTransformer(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=7)
    backbone = Backbone(body, body.out_channels, name="small swin")
    return MaskFormer(backbone=backbone, pixel_decoder=build_pixel_decoder(cfg.model, body.out_channels),
                      predictor=build_predictor(cfg.model, body.out_channels[-1]))


@pytest.fixture(scope="module")
def small_hf_swin(tmp_path_factory):
    backbone = transformers.MaskFormerSwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                                                 window_size=7, out_features=STAGES)
    model = hf_maskformer(backbone, seed=2, **SMALL_HF)
    folder = tmp_path_factory.mktemp("hf_swin")
    model.save_pretrained(folder, safe_serialization=False)  # pytorch_model.bin this time
    ours = small_swin_maskformer()
    load_model_weights(ours, folder)
    return model, folder, ours.eval()


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
@pytest.mark.parametrize("which", ["small_hf_resnet", "small_hf_swin"])
def test_small_hf_models_match(request, which, size):
    hf, _, ours = request.getfixturevalue(which)
    x = torch.randn(2, 3, *size)
    ref = hf_outputs(hf, x)
    assert ref["pred_logits"].softmax(-1).max() > 0.3  # the class head is not near-uniform
    logits_diff, masks_diff = max_differences(run(ours, x), ref)
    assert logits_diff < 1e-4 and masks_diff < 1e-4, (logits_diff, masks_diff)


def test_hf_weight_file_alone_and_facts(small_hf_resnet, small_hf_swin, tmp_path):
    hf, folder, ours = small_hf_resnet
    alone = tmp_path / "weights.safetensors"
    alone.write_bytes((folder / "model.safetensors").read_bytes())  # no config.json next to it
    converted, _ = convert(alone)
    assert converted.source_layout == "Hugging Face MaskFormerForInstanceSegmentation"
    facts = converted.facts
    assert facts["backbone"]["name"] is None and facts["backbone"]["channels"] == [128, 256, 512, 1024]
    assert facts["backbone"]["depths"] == [1, 1, 1, 1] and facts["backbone"]["block"] == "bottleneck"
    assert (facts["num_classes"], facts["num_queries"], facts["dec_layers"], facts["hidden_dim"]) == (5, 10, 2, 64)
    assert "nheads" not in facts  # only config.json knows it
    assert convert(folder)[0].facts["nheads"] == 4
    assert_same_weights(ours.state_dict(), build_model(small_resnet_config(), weights=alone).state_dict())
    # The number of heads is not in the weights: config.json catches a config that disagrees.
    with pytest.raises(CheckpointError, match="nheads: checkpoint 4, config 8"):
        convert(folder, dataclasses.replace(small_resnet_config(), model=dataclasses.replace(
            small_resnet_config().model, nheads=8)))

    _, swin_folder, swin = small_hf_swin
    swin_facts = convert(swin_folder / "pytorch_model.bin")[0].facts
    assert swin_facts["backbone"]["family"] == "swin" and swin_facts["backbone"]["name"] is None
    assert (swin_facts["backbone"]["embed_dim"], swin_facts["backbone"]["depths"],
            swin_facts["backbone"]["num_heads"], swin_facts["backbone"]["window_size"]) == (32, [1, 1, 2, 1],
                                                                                           [1, 2, 2, 4], 7)
    # A sharded save (an index file and several weight files) reads as one state dict.
    sharded = tmp_path / "sharded"
    hf_swin_model = small_hf_swin[0]
    hf_swin_model.save_pretrained(sharded, max_shard_size="300KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    resharded = small_swin_maskformer()
    load_model_weights(resharded, sharded)
    assert_same_weights(swin.state_dict(), resharded.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", SWIN_T])
def test_full_size_hf_models_match(tmp_path, backbone):
    full = dict(hidden=256, num_labels=150, queries=100, layers=6, ffn=2048, heads=8)
    if backbone == "resnet50":
        hf_backbone = transformers.ResNetConfig(depths=[3, 4, 6, 3], layer_type="bottleneck", out_features=STAGES)
    else:
        hf_backbone = transformers.MaskFormerSwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                                        window_size=7, out_features=STAGES)
    hf = hf_maskformer(hf_backbone, seed=3, **full)
    hf.save_pretrained(tmp_path)
    ours = build_model(config_from_dict({}, our_overrides(**full) + [f"model.backbone.name={backbone}"]),
                       weights=tmp_path)
    for size in [(512, 512), (384, 512)]:
        x = torch.randn(1, 3, *size)
        logits_diff, masks_diff = max_differences(run(ours, x), hf_outputs(hf, x))
        print(f"\n{backbone} {size}: max |diff| class logits {logits_diff:.2e}, mask logits {masks_diff:.2e}")
        assert logits_diff < 1e-4 and masks_diff < 1e-4, (size, logits_diff, masks_diff)


# ------------------------------------------------------------------------------------------------
# Post-processing of converted outputs against the ORIGINAL algorithm (re-stated here)
# ------------------------------------------------------------------------------------------------


def original_semantic(logits, masks, image_size, out_size, padded_size):
    masks = F.interpolate(masks[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    scores = torch.einsum("qc,qhw->chw", logits.softmax(-1)[..., :-1], masks.sigmoid())
    scores = scores[:, : image_size[0], : image_size[1]]
    return F.interpolate(scores[None], size=out_size, mode="bilinear", align_corners=False)[0]


def original_panoptic(logits, masks, image_size, out_size, padded_size, is_thing, object_threshold,
                      overlap_threshold):
    """MaskFormer's panoptic_inference as the original writes it (sem_seg_postprocess first, as with PANOPTIC_ON)."""
    masks = F.interpolate(masks[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : image_size[0], : image_size[1]]
    masks = F.interpolate(masks[None], size=out_size, mode="bilinear", align_corners=False)[0]
    scores, labels = logits.softmax(-1).max(-1)
    keep = labels.ne(logits.shape[-1] - 1) & (scores > object_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep].sigmoid()
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
    panoptic_seg = torch.zeros(out_size, dtype=torch.int32)
    segments_info = []
    current_segment_id = 0
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    cur_mask_ids = cur_prob_masks.argmax(0)
    stuff_memory_list = {}
    for k in range(cur_classes.shape[0]):
        pred_class = cur_classes[k].item()
        isthing = is_thing[pred_class]
        mask = cur_mask_ids == k
        mask_area = mask.sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        if mask_area > 0 and original_area > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if int(pred_class) in stuff_memory_list:
                    panoptic_seg[mask] = stuff_memory_list[int(pred_class)]
                    continue
                stuff_memory_list[int(pred_class)] = current_segment_id + 1
            current_segment_id += 1
            panoptic_seg[mask] = current_segment_id
            segments_info.append({"id": current_segment_id, "isthing": bool(isthing), "category_id": int(pred_class)})
    return panoptic_seg, segments_info


IS_THING = [True, False, True, False, False]


@pytest.mark.parametrize("thresholds", [(0.0, 0.0), (0.2, 0.8)])
def test_postprocessing_of_converted_outputs_matches_the_original(small_hf_resnet, small_hf_swin, thresholds):
    x = torch.randn(2, 3, 96, 160)
    image_sizes, orig_sizes = [(90, 150), (96, 131)], [(180, 300), (70, 95)]
    segments_seen = 0
    for _, _, ours in (small_hf_resnet, small_hf_swin):
        outputs = run(ours, x)
        results = postprocess(outputs, image_sizes, orig_sizes, semantic=True, panoptic=True, is_thing=IS_THING,
                              object_mask_threshold=thresholds[0], overlap_threshold=thresholds[1])
        for i, result in enumerate(results):
            args = (outputs["pred_logits"][i], outputs["pred_masks"][i], image_sizes[i], orig_sizes[i], (96, 160))
            expected_sem = original_semantic(*args)
            torch.testing.assert_close(result["sem_seg"], expected_sem, rtol=1e-5, atol=1e-6)
            assert torch.equal(result["sem_seg"].argmax(0), expected_sem.argmax(0))
            expected_seg, expected_info = original_panoptic(*args, IS_THING, *thresholds)
            seg, info = result["panoptic_seg"]
            assert torch.equal(seg, expected_seg)
            assert [{k: s[k] for k in ("id", "isthing", "category_id")} for s in info] == expected_info
            segments_seen += len(expected_info)
    assert segments_seen >= 2  # the comparison covered real segments, not only empty results


def test_hf_panoptic_postprocessing_reuses_segment_ids():
    """Documents HF's id collision (transformers issue #23461), which the original does not have.

    Queries predict [stuff 1, thing 0, stuff 1, thing 2], one quadrant each. The original gives the two
    stuff queries one segment (id 1) and the things ids 2 and 3. HF resets its running id to the fused
    stuff id, so the next thing gets id 2 again: two different objects share a segment id.
    """
    num_classes = 3
    classes = [1, 0, 1, 2]
    logits = torch.full((1, 4, num_classes + 1), -10.0)
    masks = torch.full((1, 4, 8, 8), -10.0)
    quadrants = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4)),
                 (slice(4, 8), slice(4, 8))]
    for q, (cls, (rows, cols)) in enumerate(zip(classes, quadrants)):
        logits[0, q, cls] = 10.0
        masks[0, q, rows, cols] = 10.0
    processor = transformers.MaskFormerImageProcessor()
    hf = processor.post_process_panoptic_segmentation(
        SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks), threshold=0.5,
        overlap_mask_area_threshold=0.8, label_ids_to_fuse={1})[0]
    hf_ids = [int(hf["segmentation"][rows, cols].unique().item()) for rows, cols in quadrants]
    assert hf_ids == [1, 2, 1, 2]  # the thing in quadrant 3 collides with the thing in quadrant 1

    seg, info = panoptic_inference(logits[0], masks[0], is_thing=[True, False, True], object_mask_threshold=0.5,
                                   overlap_threshold=0.8)
    ours = [int(seg[rows, cols].unique().item()) for rows, cols in quadrants]
    assert ours == [1, 2, 1, 3]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 1, False), (2, 0, True), (3, 2, True)]
    expected, _ = original_panoptic(logits[0], masks[0], (32, 32), (8, 8), (32, 32), [True, False, True], 0.5, 0.8)
    assert torch.equal(seg, expected)


# ------------------------------------------------------------------------------------------------
# ImageNet backbone weights
# ------------------------------------------------------------------------------------------------


def randomize_tensors_(state_dict: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    for name, t in state_dict.items():
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "running_var" in name
                    else torch.randn(t.shape, generator=gen))
    return state_dict


def test_timm_resnet_state_dict_to_backbone_file(tmp_path):
    classifier = timm.create_model("resnet18")
    state = randomize_tensors_(classifier.state_dict(), seed=4)
    torch.save(state, tmp_path / "resnet18.pth")
    out = tmp_path / "r18_backbone.pth"
    config = write_config(tmp_path / "r18.yaml", "resnet18")
    assert convert_main([str(tmp_path / "resnet18.pth"), str(out), "--config", config]) == 0
    stored = load_checkpoint(out)
    assert stored["kind"] == "backbone" and stored["detected"]["backbone"]["name"] == "resnet18"
    backbone = build_backbone("resnet18", pretrained=str(out))
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(CheckpointError, match="backbone weights only.*model.backbone.pretrained"):
        build_model(config, weights=out)
    with pytest.raises(CheckpointError, match="checkpoint has a ResNet-18 backbone, config says resnet50"):
        convert(tmp_path / "resnet18.pth", small_config("resnet50"))


def _torchvision_to_d2(key: str) -> str:
    """detectron2's tools/convert-torchvision-to-d2.py renaming, re-stated."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_detectron2_r50_style_pickle_to_backbone_file(tmp_path):
    classifier = timm.create_model("resnet26")  # bottleneck blocks like R-50, half the depth
    state = randomize_tensors_(classifier.state_dict(), seed=5)
    d2 = {_torchvision_to_d2(k): v.numpy() for k, v in state.items()}
    assert "stem.conv1.norm.running_var" in d2 and "res2.0.shortcut.norm.weight" in d2 and "stem.fc.weight" in d2
    with open(tmp_path / "R-26.pkl", "wb") as f:
        pickle.dump({"model": d2, "__author__": "torchvision", "matching_heuristics": True}, f)
    out = tmp_path / "r26.pth"
    converted, _ = convert(tmp_path / "R-26.pkl")
    assert converted.kind == "backbone" and converted.source_layout == "backbone (detectron2 resnet)"
    assert convert_main([str(tmp_path / "R-26.pkl"), str(out)]) == 0
    backbone = build_backbone("resnet26", pretrained=str(out))
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_official_swin_pth_to_backbone_file(tmp_path):
    body = SwinTransformer(**{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7})
    ours = randomize_tensors_(body.state_dict(), seed=6)
    official = {}
    for key, value in ours.items():
        if key.startswith("norm"):
            continue  # ImageNet files have no per-stage norms
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        official[".".join(parts)] = value
        if key.endswith("relative_position_bias_table"):
            official[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                49, 49, dtype=torch.long)
    official.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                     "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000),
                     "layers.1.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    torch.save({"model": official}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    out = tmp_path / "swin_t.pth"
    assert convert_main([str(tmp_path / "swin_tiny_patch4_window7_224.pth"), str(out),
                         "--config", SWIN_T_ADE_CONFIG]) == 0
    assert load_checkpoint(out)["detected"]["backbone"]["label"] == "Swin-T"
    backbone = build_backbone(SWIN_T, pretrained=str(out))
    for key, value in backbone.body.state_dict().items():
        if key.startswith("norm"):
            assert torch.equal(value, torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value))
        else:
            assert torch.equal(value, ours[key]), key
    # A whole model from a config whose backbone.pretrained points at the converted file.
    model = build_maskformer(small_config(SWIN_T, f"model.backbone.pretrained={out}"))
    assert torch.equal(model.backbone.body.layers[1].downsample.reduction.weight,
                       ours["layers.1.downsample.reduction.weight"])


def test_layout_detection():
    assert detect_layout({"sem_seg_head.adapter_1.weight": torch.zeros(1)}) == "official"
    assert detect_layout({"module.sem_seg_head.predictor.class_embed.weight": torch.zeros(1)}) == "official"
    assert detect_layout({"class_predictor.weight": torch.zeros(1)}) == "huggingface"
    assert detect_layout({"predictor.query_embed.weight": torch.zeros(1),
                          "pixel_decoder.layer_1.weight": torch.zeros(1)}) == "maskformer"
    assert detect_layout({"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)}) == "backbone"
    assert detect_layout(small_swin_maskformer().state_dict()) == "maskformer"


def test_trainable_batchnorm_counters(tmp_path):
    """Our checkpoints keep BatchNorm counters; foreign layouts (which have none) get zeros for a trainable BN."""
    cfg = small_config("resnet18", "model.backbone.freeze_bn=false")
    source = randomize_(build_maskformer(cfg), seed=9)
    source.backbone.body.bn1.num_batches_tracked.fill_(7)
    torch.save({"model": source.state_dict()}, tmp_path / "ours.pth")
    assert build_model(cfg, weights=tmp_path / "ours.pth").backbone.body.bn1.num_batches_tracked.item() == 7
    official = to_official({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")},
                           v1=False)
    model = build_model(cfg, weights=write_pkl(tmp_path / "official.pkl", official))
    assert model.backbone.body.bn1.num_batches_tracked.item() == 0
    assert torch.equal(model.backbone.body.bn1.running_var, source.backbone.body.bn1.running_var)


@pytest.mark.parametrize("architecture", ["per_pixel_baseline", "per_pixel_baseline_plus"])
def test_official_per_pixel_baselines_convert_with_their_config(tmp_path, architecture):
    extra = ["model.num_queries=5"] if architecture.endswith("plus") else []
    cfg = small_config("resnet18", f"model.architecture={architecture}", *extra)
    source = randomize_(build_maskformer(cfg), seed=11)
    official = to_official(source.state_dict(), v1=True, protocol_extras=False)
    assert ("sem_seg_head.predictor.weight" in official) == (architecture == "per_pixel_baseline")
    pkl = write_pkl(tmp_path / "baseline.pkl", official)
    assert_same_weights(source.state_dict(), build_model(cfg, weights=pkl).state_dict())
    with pytest.raises(CheckpointError, match="give the config"):
        convert(pkl)
