"""Training engine: optimiser groups, schedules, checkpoints, resume, NaN stop, DDP equivalence."""

import copy
import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from maskformer.checkpoint import load_checkpoint, save_checkpoint
from maskformer.config import SolverConfig, config_from_dict
from maskformer.engine.optim import build_optimizer, lr_factor, param_groups
from maskformer.engine.trainer import NonFiniteLossError, train
from maskformer.models.build import build_maskformer
from tests.conftest import TINY_OVERRIDES, TINY_TRAINING, tiny_config

REPO = Path(__file__).resolve().parents[1]

RUN = TINY_TRAINING + ["train.checkpoint_period=3"]


def run_config(*extra):
    return tiny_config(*RUN, *extra)


def test_param_groups_follow_the_original():
    model = build_maskformer(tiny_config())
    solver = SolverConfig(base_lr=1.0, weight_decay=0.5, backbone_multiplier=0.1)
    groups = {n: (g["lr"], g["weight_decay"]) for g in param_groups(model, solver) for n in g["names"]}
    assert groups["backbone.body.conv1.0.weight"] == (0.1, 0.5)
    assert groups["pixel_decoder.adapter_1.norm.weight"] == (1.0, 0.0)  # GroupNorm
    assert groups["predictor.decoder.layers.0.norm1.bias"] == (1.0, 0.0)  # LayerNorm
    assert groups["predictor.query_embed.weight"] == (1.0, 0.0)  # Embedding
    assert groups["predictor.class_embed.bias"] == (1.0, 0.5)  # biases are not exempt by default
    assert groups["pixel_decoder.mask_features.weight"] == (1.0, 0.5)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups) == n_params
    solver.weight_decay_bias = 0.0
    groups = {n: g["weight_decay"] for g in param_groups(model, solver) for n in g["names"]}
    assert groups["predictor.class_embed.bias"] == 0.0
    assert isinstance(build_optimizer(model, solver), torch.optim.AdamW)


def test_fused_adamw_takes_the_same_steps_as_the_reference_loop():
    torch.manual_seed(0)
    model = build_maskformer(tiny_config())
    solver = SolverConfig(base_lr=1e-3, weight_decay=0.05)
    optimizer = build_optimizer(model, solver)
    assert optimizer.defaults["fused"] is True
    reference_model = copy.deepcopy(model)
    reference = torch.optim.AdamW(param_groups(reference_model, solver), lr=1e-3, betas=tuple(solver.betas),
                                  foreach=False)
    pairs = [(p, q) for p, q in zip(model.parameters(), reference_model.parameters()) if p.requires_grad]
    initial = [p.detach().clone() for p, _ in pairs]
    for _ in range(3):
        for p, q in pairs:
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step(), reference.step()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert all(not torch.equal(p, p0) for (p, _), p0 in zip(pairs, initial))  # every parameter took steps


def test_swin_relative_position_tables_have_no_weight_decay():
    from maskformer.models.backbone import build_backbone

    backbone = build_backbone("swin_tiny_patch4_window7_224")
    wrapper = torch.nn.Module()
    wrapper.backbone = backbone
    groups = {n: g["weight_decay"] for g in param_groups(wrapper, SolverConfig(weight_decay=0.01)) for n in g["names"]}
    tables = [n for n in groups if "relative_position_bias_table" in n]
    assert tables and all(groups[n] == 0.0 for n in tables)


def test_poly_schedule_with_linear_warmup_matches_detectron2_formula():
    s = SolverConfig(max_iter=1000, warmup_iters=100, warmup_factor=1e-6, poly_power=0.9)
    for it in (0, 50, 99, 100, 500, 999):
        warm = 1.0 if it >= 100 else 1e-6 * (1 - it / 100) + it / 100
        assert lr_factor(it, s) == pytest.approx(warm * (1 - it / 1000) ** 0.9)
    assert lr_factor(0, SolverConfig(max_iter=10)) == 1.0
    m = SolverConfig(lr_scheduler="multistep", steps=[10, 20], gamma=0.1, max_iter=30)
    assert [lr_factor(i, m) for i in (9, 10, 19, 20)] == pytest.approx([1, 0.1, 0.1, 0.01])
    c = SolverConfig(warmup_iters=10, warmup_factor=0.25, warmup_method="constant", max_iter=100, poly_power=0.0)
    assert [lr_factor(i, c) for i in (0, 9, 10)] == [0.25, 0.25, 1.0]


def test_checkpoints_are_atomic_and_load_with_weights_only(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 3, "config": {"a": [1, 2]}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"bad": Boom()}, path)
    data = load_checkpoint(path)  # the old file is intact
    assert data["iteration"] == 3 and list(tmp_path.iterdir()) == [path]


def _final_weights(output_dir):
    return load_checkpoint(Path(output_dir) / "checkpoints" / "last.pth")["model"]


def _train_losses(output_dir):
    rows = [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]
    return {r["iteration"]: r["total_loss"] for r in rows if r["kind"] == "train"}


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    full = train(run_config("solver.max_iter=6"), tmp_path / "full")
    assert full["iteration"] == 6

    from maskformer.engine import trainer

    real_step = trainer.train_step

    def interrupted(*args, iteration, **kwargs):
        if iteration == 4:  # killed in the 5th step: iteration 4 ran but only 3 was checkpointed
            raise KeyboardInterrupt
        return real_step(*args, iteration=iteration, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(run_config("solver.max_iter=6"), tmp_path / "split")
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = train(run_config("solver.max_iter=6"), tmp_path / "split", resume=True)
    assert resumed["iteration"] == 6
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert _train_losses(tmp_path / "full") == _train_losses(tmp_path / "split")
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "iteration", "rng", "config"} <= set(ckpt)
    assert (tmp_path / "full" / "config.yaml").is_file() and (tmp_path / "full" / "log.txt").is_file()


def test_a_new_run_in_an_old_output_dir_keeps_its_own_metrics(tmp_path):
    out = tmp_path / "run"
    train(run_config("solver.max_iter=2", "train.log_period=1"), out)
    train(run_config("solver.max_iter=3", "train.log_period=1"), out)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if r["kind"] == "train"] == [1, 2, 3]  # the second run only
    (previous,) = out.glob("metrics.*.jsonl")
    assert [json.loads(line)["iteration"] for line in open(previous)
            if json.loads(line)["kind"] == "train"] == [1, 2]
    assert previous.name in (out / "log.txt").read_text()


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*last.pth"):
        train(run_config("solver.max_iter=2"), tmp_path / "none", resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train(run_config("solver.max_iter=3"), out)
    good = _final_weights(out)
    from maskformer.models import criterion as criterion_module

    original = criterion_module.SetCriterion.forward

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses

    monkeypatch.setattr(criterion_module.SetCriterion, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"iteration 4: .*loss_dice=nan"):
        train(run_config("solver.max_iter=6"), out, resume=True)
    after = _final_weights(out)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_gradient_accumulation_and_evaluation_run(tmp_path):
    result = train(run_config("solver.max_iter=2", "solver.grad_accum_steps=2", "train.eval_period=2",
                              "test.panoptic_on=true"), tmp_path / "acc")
    assert {"sem_seg", "panoptic_seg"} <= set(result["metrics"])
    rows = [json.loads(line) for line in open(tmp_path / "acc" / "metrics.jsonl")]
    assert any(r["kind"] == "eval" and "mIoU" in r and "PQ" in r for r in rows)
    assert all(math.isfinite(r["total_loss"]) for r in rows if r["kind"] == "train")


def test_train_cli_help_and_errors(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import train as train_tool

    with pytest.raises(SystemExit):
        train_tool.main(["--help"])
    assert "section.key=value" in capsys.readouterr().out
    assert train_tool.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({}))
    assert train_tool.main(["--config", str(cfg), "solver.max_itr=3"]) == 2
    assert "did you mean 'solver.max_iter'" in capsys.readouterr().err
    overrides = TINY_OVERRIDES + RUN + ["solver.max_iter=1"]
    assert train_tool.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o"), *overrides]) == 0
    assert (tmp_path / "o" / "checkpoints" / "last.pth").is_file()
    assert train_tool.main(["--config", str(cfg), "--print-config", *overrides]) == 0
    assert "num_classes: 7" in capsys.readouterr().out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, output_dir, overrides):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        train(tiny_config(*overrides), output_dir)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    # SGD keeps the comparison linear in the gradients: AdamW's first steps move every weight by
    # about +-lr whatever the gradient's size, so summation-order noise in near-zero gradients
    # (they differ in the last bits between 1 and 2 processes) would show up as lr-sized gaps.
    overrides = RUN + ["solver.max_iter=4", "model.dropout=0.0", "train.checkpoint_period=0",
                       "solver.optimizer=sgd", "solver.base_lr=0.02", "solver.clip_grad_norm=0"]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), overrides), nprocs=2)
    train(tiny_config(*overrides), tmp_path / "single")
    a, b = _final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "single")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    from maskformer.engine.trainer import seed_everything

    seed_everything(42)  # the runs' seed (train.seed) for rank 0
    init = build_maskformer(tiny_config(*overrides)).state_dict()
    moved = max((a[k].float() - init[k].float()).abs().max().item() for k in a)
    assert moved > 1e-2, "the runs barely trained: the comparison would be vacuous"
    la, lb = _train_losses(tmp_path / "ddp"), _train_losses(tmp_path / "single")
    assert la.keys() == lb.keys()
    assert all(la[i] == pytest.approx(lb[i], abs=1e-5) for i in la)
