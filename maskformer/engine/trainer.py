"""The training loop: one readable, iteration-based function.

``train(cfg)`` builds the model, loss, optimiser, schedule and data from the config and runs
``cfg.solver.max_iter`` optimizer steps, with mixed precision, gradient accumulation, full-model
gradient clipping, periodic evaluation and atomic checkpoints. Under ``torchrun`` it trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs); rank 0 alone writes.

An *iteration* is one optimizer step over ``solver.ims_per_batch`` images (all processes together),
split into ``solver.grad_accum_steps`` micro-batches per process.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from maskformer.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from maskformer.config import Config, config_to_dict, save_config
from maskformer.data import build_test_loader, build_train_loader, get_metadata
from maskformer.distributed import all_gather_objects, barrier, get_rank, get_world_size, is_main_process
from maskformer.engine.evaluate import autocast_context, evaluate, headline
from maskformer.engine.logger import RunLogger, Throughput, format_seconds, peak_memory_mb
from maskformer.engine.memory import keep_freed_memory
from maskformer.engine.optim import build_optimizer, build_scheduler, lr_factor
from maskformer.models.build import build_criterion, build_maskformer


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss becomes NaN or infinite; the message names the iteration and the loss terms."""


# ------------------------------------------------------------------------------------------------
# Set-up helpers
# ------------------------------------------------------------------------------------------------


def setup_distributed(device_name: str) -> torch.device:
    """Join the process group torchrun describes (if any) and return this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device_name!r} but CUDA is not available; use train.device=cpu")
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    if use_cuda:
        if device_name.startswith("cuda:") and world_size == 1:
            return torch.device(device_name)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's random states as plain data (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_output_dir(cfg: Config) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    stem = Path(cfg.source).stem if cfg.source else "run"
    return Path("outputs") / stem


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, list[dict]]:
    images = batch["images"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [{"labels": t["labels"].to(device, non_blocking=True), "masks": t["masks"].to(device, non_blocking=True)}
               for t in batch["targets"]]
    if "sem_seg" in batch:  # per-pixel losses (the paper's baselines) read the label map
        for target, sem_seg in zip(targets, batch["sem_seg"]):
            target["sem_seg"] = sem_seg.to(device, non_blocking=True)
    return images, targets


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Split a collated batch into ``parts`` micro-batches along the batch dimension."""
    if parts == 1:
        return [batch]
    size = batch["images"].shape[0]
    if size % parts:
        raise ValueError(f"a batch of {size} images cannot be split into {parts} micro-batches")
    step = size // parts
    return [{key: batch[key][i:i + step] for key in ("images", "targets", "sem_seg") if key in batch}
            for i in range(0, size, step)]


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------


def train_step(model, criterion, optimizer, scaler, batch: dict, *, device: torch.device, amp: str,
               accum_steps: int, clip_grad_norm: float, channels_last: bool, iteration: int) -> dict[str, float]:
    """Forward, loss, backward over the micro-batches, then clip and step. Returns the loss terms (floats)."""
    micro_batches = split_batch(batch, accum_steps)
    optimizer.zero_grad(set_to_none=True)
    logged: dict[str, float] = {}
    for i, micro in enumerate(micro_batches):
        images, targets = _to_device(micro, device, channels_last)
        last = i == len(micro_batches) - 1
        # DDP: synchronise gradients only on the last micro-batch.
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with autocast_context(device, amp):
                outputs = model(images)
            losses = criterion(outputs, targets)  # fp32 inside
            total = criterion.total_loss(losses)
            _check_finite(total, losses, iteration)
            scaler.scale(total / accum_steps).backward()
        for key, value in losses.items():
            logged[key] = logged.get(key, 0.0) + value.item() / accum_steps
        logged["total_loss"] = logged.get("total_loss", 0.0) + total.item() / accum_steps
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return logged


def _check_finite(total: torch.Tensor, losses: dict[str, torch.Tensor], iteration: int) -> None:
    finite = torch.isfinite(total.detach()).float()
    if dist.is_initialized():  # every rank must stop together, or the others hang in backward
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in sorted(losses.items()))
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration + 1}: total={total.item():.4g}; "
                                 f"terms: {terms}. The last good checkpoint is left as it was.")


def _reduce_for_logging(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / get_world_size() for k, v in zip(keys, t.tolist())}


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def train(cfg: Config, output_dir: str | os.PathLike | None = None, resume: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says; returns {"iteration", "metrics" (last evaluation), "output_dir"}.

    Args:
        output_dir: default ``cfg.output.dir`` or ``outputs/<config stem>``.
        resume: continue from ``<output_dir>/checkpoints/last.pth``.
    """
    device = setup_distributed(cfg.train.device)
    rank, world_size = get_rank(), get_world_size()
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    solver, runtime = cfg.solver, cfg.train
    if runtime.amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")
    per_rank = solver.ims_per_batch // world_size if solver.ims_per_batch % world_size == 0 else None
    if per_rank is None or per_rank % solver.grad_accum_steps:
        raise ValueError(f"solver.ims_per_batch ({solver.ims_per_batch}) must be divisible by the number of "
                         f"processes ({world_size}) times solver.grad_accum_steps ({solver.grad_accum_steps})")

    out = Path(output_dir) if output_dir is not None else default_output_dir(cfg)
    ckpt_dir = out / "checkpoints"
    last_path = ckpt_dir / "last.pth"
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"output directory {out} is not writable")
        save_config(cfg, out / "config.yaml")
    barrier()
    log = RunLogger(out, enabled=is_main_process(), fresh=not resume)
    log.info(f"output directory: {out.resolve()}  (rank {rank} of {world_size}, device {device})")

    seed_everything(runtime.seed + rank)
    model = build_maskformer(cfg).to(device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg).to(device)
    optimizer = build_optimizer(model, solver)
    scheduler = build_scheduler(optimizer, solver)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp == "fp16")
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"model: {n_params / 1e6:.2f}M parameters; {world_size} process(es) x {per_rank} images per step")

    start_iter, best, saved_rng = 0, None, None
    if resume:
        ckpt = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_iter, best = ckpt["iteration"], ckpt.get("best")
        # Recompute the learning rates from the (possibly edited, e.g. longer) schedule.
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * lr_factor(start_iter, solver)
        states = ckpt.get("rng", [])
        saved_rng = states[rank] if len(states) == world_size else None
        log.info(f"resumed from {last_path} at iteration {start_iter}")

    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward_model = torch.compile(train_model) if runtime.compile else train_model
    train_metadata = get_metadata(cfg, "train")
    loader = build_train_loader(cfg, rank, world_size, start_iter=start_iter)
    data_iter = iter(loader)
    test_loader = None
    if saved_rng is not None:
        set_rng_state(saved_rng)  # after building loaders, right where the interrupted run stopped
    log.info(f"training {train_metadata.name}: iterations {start_iter} -> {solver.max_iter}")

    def checkpoint(iteration: int, extra_names: tuple[str, ...] = ()) -> None:
        states = all_gather_objects(rng_state())
        if not is_main_process():
            return
        payload = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                   "rng": states, "config": config_to_dict(cfg), "best": best}
        for name in extra_names:
            save_checkpoint(payload, ckpt_dir / name)
        save_checkpoint(payload, last_path)
        if runtime.keep_checkpoints > 0:
            periodic = sorted(ckpt_dir.glob("model_*.pth"))
            for old in periodic[:-runtime.keep_checkpoints]:
                old.unlink()

    def run_evaluation(iteration: int) -> dict:
        nonlocal test_loader, best
        if test_loader is None:
            test_loader = build_test_loader(cfg, rank, world_size)
        state = rng_state()  # evaluation must not change the training's random streams
        metrics = evaluate(model, test_loader, get_metadata(cfg, "test"), cfg.test, device, amp=runtime.amp,
                           channels_last=runtime.channels_last)
        set_rng_state(state)
        summary = headline(metrics)
        log.info(f"eval @ {iteration}: " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items())
                 + f"  ({metrics['time']['seconds']:.1f}s)")
        log.record(iteration, {**summary, "elapsed": time.perf_counter() - t_start}, kind="eval")
        if is_main_process():
            (out / "eval").mkdir(exist_ok=True)
            with open(out / "eval" / f"iter_{iteration:07d}.json", "w") as f:
                json.dump(metrics, f, indent=1)
        return metrics

    throughput = Throughput()
    metrics: dict = {}
    t_start = time.perf_counter()
    iteration = start_iter
    try:
        while iteration < solver.max_iter:
            t0 = time.perf_counter()
            batch = next(data_iter)
            t_data = time.perf_counter() - t0
            losses = train_step(forward_model, criterion, optimizer, scaler, batch, device=device, amp=runtime.amp,
                                accum_steps=solver.grad_accum_steps, clip_grad_norm=solver.clip_grad_norm,
                                channels_last=runtime.channels_last, iteration=iteration)
            lr = max(g["lr"] for g in optimizer.param_groups)
            scheduler.step()
            iteration += 1
            throughput.update(time.perf_counter() - t0, t_data)

            if iteration % runtime.log_period == 0 or iteration == solver.max_iter or iteration == start_iter + 1:
                losses = _reduce_for_logging(losses, device)
                eta = throughput.seconds_per_iter * (solver.max_iter - iteration)
                main = {k: losses[k] for k in ("loss_ce", "loss_mask", "loss_dice") if k in losses}
                log.info(f"iter {iteration}/{solver.max_iter}  loss {losses['total_loss']:.4f}  "
                         + "  ".join(f"{k} {v:.4f}" for k, v in main.items())
                         + f"  lr {lr:.3g}  {throughput.seconds_per_iter:.3f}s/it  data {throughput.data_seconds:.3f}s"
                         + f"  eta {format_seconds(eta)}  mem {peak_memory_mb(device):.0f}MB")
                log.record(iteration, {**losses, "lr": lr, "time": throughput.seconds_per_iter,
                                       "data_time": throughput.data_seconds, "elapsed": time.perf_counter() - t_start})

            final = iteration == solver.max_iter
            if (runtime.eval_period > 0 and iteration % runtime.eval_period == 0) or final:
                metrics = run_evaluation(iteration)
                key = runtime.best_metric
                value = headline(metrics).get(key) if key else None
                is_best = value is not None and math.isfinite(value) and (best is None or value > best["value"])
                if is_best:
                    best = {"metric": key, "value": value, "iteration": iteration}
            else:
                is_best = False
            periodic = runtime.checkpoint_period > 0 and iteration % runtime.checkpoint_period == 0
            if periodic or final or is_best:
                names = (f"model_{iteration:07d}.pth",) if periodic else ()
                checkpoint(iteration, names + (("best.pth",) if is_best else ()))
    finally:
        log.info(f"stopped at iteration {iteration} after "
                 f"{datetime.timedelta(seconds=int(time.perf_counter() - t_start))}")
        log.close()
    return {"iteration": iteration, "metrics": metrics, "output_dir": out}
