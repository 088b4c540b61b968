"""The performance paths give the plain formulas' results: the fused, chunked mask losses (values
and gradients), the batched/chunked matcher, bf16 autocast and channels_last on CPU, torch.compile."""

import shutil

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from maskformer.engine.evaluate import autocast_context
from maskformer.models.build import build_criterion, build_maskformer
from maskformer.models.criterion import MaskLosses, SetCriterion, binary_cross_entropy_with_logits, build_weight_dict
from maskformer.models.matcher import HungarianMatcher, batch_dice_cost, batch_focal_cost, downsample_masks
from maskformer.models.predictor import MaskEinsum
from tests.conftest import tiny_config


def _reference_mask_losses(logits, targets, size, focal=True, alpha=0.25, gamma=2.0):
    """Plain autograd composition: upsample, torchvision focal (or BCE), dice; per mask."""
    x = logits if size is None else F.interpolate(logits[:, None], size=size, mode="bilinear",
                                                  align_corners=False).flatten(1)
    t = targets.flatten(1)
    if focal:
        mask = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none").mean(1)
    else:
        mask = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    p = x.sigmoid()
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return mask, dice


@pytest.mark.parametrize("focal,gamma", [(True, 2.0), (True, 1.5), (True, 0.0), (False, 2.0)])
def test_mask_losses_gradcheck(focal, gamma):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 5, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    targets = (torch.rand(3, 20, 24, generator=g) > 0.5).double()
    index = torch.tensor([2, 0, 2, 1])
    assert torch.autograd.gradcheck(lambda x: MaskLosses.apply(x, targets, index, (20, 24), focal, 0.25, gamma),
                                    (logits,))
    mask, dice = MaskLosses.apply(logits, targets, index, (20, 24), focal, 0.25, gamma)
    ref_mask, ref_dice = _reference_mask_losses(logits, targets[index], (20, 24), focal, 0.25, gamma)
    assert torch.allclose(mask, ref_mask, atol=1e-12) and torch.allclose(dice, ref_dice, atol=1e-12)


def test_mask_losses_on_points_with_soft_targets_gradcheck():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.rand(3, 40, generator=g, dtype=torch.float64)  # bilinearly sampled masks are fractional
    assert torch.autograd.gradcheck(lambda x: MaskLosses.apply(x, targets, torch.arange(3), None, True, 0.25, 2.0),
                                    (logits,))


def test_chunked_mask_losses_equal_the_plain_formulas_in_fp32():
    # 256x256 targets: a chunk holds 8 masks on a CPU, so 19 masks take 3 chunks.
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(19, 64, 64, generator=g) * 4).requires_grad_()
    targets = (torch.rand(5, 256, 256, generator=g) > 0.5).float()
    index = torch.randint(0, 5, (19,), generator=g)
    weights = torch.rand(2, 19, generator=g)

    mask, dice = MaskLosses.apply(logits, targets, index, (256, 256), True, 0.25, 2.0)
    ((mask * weights[0]).sum() + (dice * weights[1]).sum()).backward()
    grad, logits.grad = logits.grad, None
    ref_mask, ref_dice = _reference_mask_losses(logits, targets[index], (256, 256))
    ((ref_mask * weights[0]).sum() + (ref_dice * weights[1]).sum()).backward()
    assert torch.allclose(mask, ref_mask, rtol=1e-5, atol=1e-7)
    assert torch.allclose(dice, ref_dice, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grad, logits.grad, rtol=1e-4, atol=1e-9)


def test_fast_bce_is_as_accurate_as_torch():
    x = torch.linspace(-30, 30, 1001)
    for t in (torch.zeros_like(x), torch.ones_like(x), torch.rand(1001)):
        exact = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none")
        ours = binary_cross_entropy_with_logits(x, t).double()
        # ~1 ulp, plus ~1e-7 absolute where log(1 + e) rounds e away (torch's fp32 cancels worse at t=0)
        assert ((ours - exact).abs() <= 1.2e-7 + 2.5e-7 * exact).all()
        torch_fp32 = F.binary_cross_entropy_with_logits(x, t, reduction="none").double()
        assert (ours - exact).abs().max() <= 1.2 * (torch_fp32 - exact).abs().max()


def test_criterion_gradients_equal_a_plain_per_layer_reference():
    g = torch.Generator().manual_seed(3)
    layers = 3
    logits = torch.randn(layers, 2, 6, 5, generator=g).requires_grad_()
    masks = (torch.randn(layers, 2, 6, 8, 9, generator=g) * 2).requires_grad_()
    targets = [{"labels": torch.tensor([1, 3, 0]), "masks": (torch.rand(3, 32, 36, generator=g) > 0.5).float()},
               {"labels": torch.tensor([2]), "masks": (torch.rand(1, 32, 36, generator=g) > 0.5).float()}]
    outputs = {"pred_logits": logits[-1], "pred_masks": masks[-1],
               "aux_outputs": [{"pred_logits": a, "pred_masks": b} for a, b in zip(logits[:-1], masks[:-1])]}
    crit = SetCriterion(4, HungarianMatcher(), build_weight_dict(1, 20, 1, layers, True))
    losses = crit(outputs, targets)
    crit.total_loss(losses).backward()
    grad, masks.grad = masks.grad, None

    # reference: each layer on its own, plain autograd, with the same (independent) matchings
    indices = crit.match([outputs, *outputs["aux_outputs"]], targets)
    total = 0
    for layer, suffix, idx in zip((layers - 1, *range(layers - 1)), ["", "_0", "_1"], indices):
        src = torch.cat([masks[layer, b, i] for b, (i, _) in enumerate(idx)])
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, idx)])
        mask, dice = _reference_mask_losses(src, tgt, (32, 36))
        assert losses["loss_mask" + suffix].item() == pytest.approx(mask.sum().item() / 4, rel=1e-5)
        assert losses["loss_dice" + suffix].item() == pytest.approx(dice.sum().item() / 4, rel=1e-5)
        total = total + 20 * mask.sum() / 4 + dice.sum() / 4
    total.backward()
    assert torch.allclose(grad, masks.grad, rtol=1e-4, atol=1e-8)


def test_batched_matching_equals_matching_each_layer():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 2, 10, 7, generator=g)
    masks = torch.randn(4, 2, 10, 12, 12, generator=g) * 3
    labels = [torch.tensor([1, 5, 2]), torch.tensor([], dtype=torch.int64)]
    targets = [(torch.rand(3, 12, 12, generator=g) > 0.5).float(), torch.zeros(0, 12, 12)]
    matcher = HungarianMatcher()
    batched = matcher.match_layers(logits, masks, labels, targets)
    for layer in range(4):
        single = matcher.match(logits[layer], masks[layer], labels, targets)
        for (r1, c1), (r2, c2) in zip(batched[layer], single):
            assert r1.tolist() == r2.tolist() and c1.tolist() == c2.tolist()
        cost = matcher.cost_matrix(logits[layer, 0], masks[layer, 0], labels[0], targets[0])
        stacked = matcher.cost_matrix(logits[:, 0], masks[:, 0], labels[0], targets[0])[layer]
        assert torch.allclose(cost, stacked, atol=1e-6)
    assert batched[0][1][0].numel() == 0


def test_cpu_cost_blocks_equal_one_block_and_the_hugging_face_costs():
    hf = pytest.importorskip("transformers.models.maskformer.modeling_maskformer")
    g = torch.Generator().manual_seed(5)
    out = torch.randn(2, 30, 128 * 96, generator=g) * 4  # 12288 pixels: blocks of 21 rows
    tgt = (torch.rand(6, 128 * 96, generator=g) > 0.7).float()
    matcher = HungarianMatcher()
    blocked = matcher._mask_costs(out, tgt)
    assert torch.allclose(blocked, matcher._mask_costs_block(out, tgt), atol=1e-5)
    for layer in range(2):
        ref = 20 * hf.pair_wise_sigmoid_focal_loss(out[layer], tgt) + hf.pair_wise_dice_loss(out[layer], tgt)
        assert torch.allclose(blocked[layer], ref, atol=1e-5)
    assert torch.allclose(batch_focal_cost(out[0], tgt), hf.pair_wise_sigmoid_focal_loss(out[0], tgt), atol=1e-6)
    assert torch.allclose(batch_dice_cost(out[0], tgt), hf.pair_wise_dice_loss(out[0], tgt), atol=1e-6)


def test_point_sampled_matching_draws_independent_points_per_layer():
    g = torch.Generator().manual_seed(6)
    masks = torch.randn(1, 10, 16, 16, generator=g).expand(3, -1, -1, -1)  # identical layers
    targets = (torch.rand(4, 64, 64, generator=g) > 0.5).float()
    cost = HungarianMatcher(num_points=50).cost_matrix(torch.zeros(3, 10, 5), masks, torch.arange(4), targets)
    assert cost.shape == (3, 10, 4)
    assert not torch.allclose(cost[0], cost[1])  # different random points, as separate calls would draw


def test_mask_einsum_skips_zero_gradient_rows_exactly():
    g = torch.Generator().manual_seed(7)
    embed = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 4, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = MaskEinsum.apply(embed, features)
    ref = torch.einsum("lbqc,bchw->lbqhw", embed, features)
    assert torch.equal(out, ref)
    grad = torch.zeros_like(out)  # sparse, as the mask losses leave it: only matched queries
    grad[0, 0, 1] = torch.randn(3, 6, generator=g, dtype=torch.float64)
    grad[2, 1, 4] = 1.0
    ours = torch.autograd.grad(out, (embed, features), grad)
    for a, b in zip(ours, torch.autograd.grad(ref, (embed, features), grad)):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(MaskEinsum.apply, (embed, features))


def test_mask_einsum_under_bf16_autocast_and_channels_last():
    g = torch.Generator().manual_seed(8)
    embed = torch.randn(2, 2, 5, 8, generator=g, requires_grad=True)
    features = torch.randn(2, 8, 4, 6, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MaskEinsum.apply(embed, features)
        ref = torch.einsum("lbqc,bchw->lbqhw", embed, features)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    grads = torch.autograd.grad(out.float().square().sum(), (embed, features))
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (embed, features))
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-2, atol=1e-2)


def _tiny_step(cfg, amp, channels_last):
    torch.manual_seed(0)
    model = build_maskformer(cfg).train()
    criterion = build_criterion(cfg)
    x = torch.randn(2, 3, 64, 64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :30] = 1
    masks[1, :, 30:] = 1
    targets = [{"labels": torch.tensor([1, 2]), "masks": masks}, {"labels": torch.tensor([3]), "masks": masks[:1]}]
    with autocast_context(torch.device("cpu"), amp):
        outputs = model(x)
    losses = criterion(outputs, targets)
    total = criterion.total_loss(losses)
    total.backward()
    return outputs, losses, total, model


def test_cpu_bf16_autocast_with_channels_last_trains_with_fp32_losses():
    cfg = tiny_config("model.dropout=0.0")
    out32, losses32, total32, _ = _tiny_step(cfg, "off", False)
    out16, losses16, total16, model = _tiny_step(cfg, "bf16", True)
    assert out16["pred_masks"].dtype == torch.bfloat16  # the network ran in bf16 ...
    assert all(v.dtype == torch.float32 for v in losses16.values())  # ... the losses in fp32
    assert torch.isfinite(total16) and total16.item() == pytest.approx(total32.item(), rel=0.05)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_channels_last_gives_the_same_outputs():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_maskformer(cfg).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out["pred_masks"], ref["pred_masks"], atol=1e-5)
    assert torch.allclose(out["pred_logits"], ref["pred_logits"], atol=1e-5)


def test_cpu_inputs_enter_channels_last_with_the_same_outputs():
    torch.manual_seed(0)
    model = build_maskformer(tiny_config()).eval()
    plain = build_maskformer(tiny_config("model.cpu_channels_last=false")).eval()
    plain.load_state_dict(model.state_dict())
    layouts = []
    for m in (model, plain):
        m.backbone.register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out, ref = model(x), plain(x)
    assert layouts == [True, False]
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=1e-4, atol=1e-5)


def test_matcher_downsampling_is_done_once_for_all_layers(monkeypatch):
    import maskformer.models.matcher as matcher_module

    calls = []
    monkeypatch.setattr(matcher_module, "downsample_masks",
                        lambda masks, size: calls.append(1) or downsample_masks(masks, size))
    cfg = tiny_config("model.dec_layers=4")
    torch.manual_seed(0)
    model, criterion = build_maskformer(cfg).train(), build_criterion(cfg)
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 64, 64)}] * 2
    losses = criterion(model(torch.randn(2, 3, 64, 64)), targets)
    assert len(losses) == 12 and len(calls) == 2  # once per image, not once per image and layer


@pytest.mark.slow
def test_compiled_model_equals_eager():
    if not hasattr(torch, "compile") or shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_maskformer(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        try:
            out = torch.compile(model)(x)
        except Exception as error:  # a platform without a working inductor toolchain
            pytest.skip(f"torch.compile is not usable here: {type(error).__name__}: {error}"[:300])
    assert torch.allclose(out["pred_logits"], ref["pred_logits"], atol=1e-5)
    assert torch.allclose(out["pred_masks"], ref["pred_masks"], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# fp32 linear layers through oneDNN (maskformer/models/linear.py)
# ------------------------------------------------------------------------------------------------


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten operators a block of code runs."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12), (2, 4, 3, 12), (2, 16, 12), (0, 12)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_equals_f_linear_with_gradients(shape, with_bias):
    from maskformer.models.linear import OneDNNLinear

    torch.manual_seed(0)
    layer = OneDNNLinear(12, 9, bias=with_bias)
    reference = torch.nn.Linear(12, 9, bias=with_bias)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # on one thread PyTorch keeps small 1x1 convolutions off oneDNN (test below)
    try:
        with _OpRecorder() as recorder:
            out = layer(x)
    finally:
        torch.set_num_threads(threads)
    ref = reference(x_ref)
    if x.numel():
        assert "convolution" in recorder.ops and not {"addmm", "mm"} & recorder.ops  # really the oneDNN path
    assert out.shape == ref.shape == (*shape[:-1], 9)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    out.backward(grad), ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5)


def test_onednn_linear_on_a_non_contiguous_input_and_its_fallbacks():
    from maskformer.models.linear import OneDNNLinear

    torch.manual_seed(0)
    layer = OneDNNLinear(6, 4)
    x = torch.randn(3, 6, 5).transpose(1, 2)  # [3, 5, 6], not contiguous
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    # float64, and bf16 autocast (whose CPU products already run on oneDNN), take F.linear
    with _OpRecorder() as recorder:
        assert layer.double()(x.double()).dtype == torch.float64
    assert "convolution" not in recorder.ops
    layer.float()
    with torch.autocast("cpu", torch.bfloat16), _OpRecorder() as recorder:
        out = layer(x)
    assert out.dtype == torch.bfloat16 and "convolution" not in recorder.ops


def test_onednn_linear_on_one_thread_only_where_pytorch_sends_the_convolution_to_onednn():
    from maskformer.models.linear import OneDNNLinear

    layer, threads = OneDNNLinear(6, 4), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for tokens, expect_conv in ((32, True), (7, False)):  # a batch of 16 images, or F.linear
            x = torch.randn(tokens, 6)
            with _OpRecorder() as recorder:
                out = layer(x)
            assert ("convolution" in recorder.ops) == expect_conv
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_cpu_linear_switch_keeps_weights_and_outputs():
    from maskformer.models.linear import OneDNNLinear

    cfg = tiny_config()
    torch.manual_seed(0)
    fast = build_maskformer(cfg).eval()
    plain = build_maskformer(tiny_config("model.cpu_linear=blas")).eval()
    assert any(type(m) is OneDNNLinear for m in fast.modules())
    assert not any(type(m) is OneDNNLinear for m in plain.modules())
    plain.load_state_dict(fast.state_dict())  # same keys, same shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, ref = fast(x), plain(x)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="model.cpu_linear"):
        tiny_config("model.cpu_linear=mkl")
