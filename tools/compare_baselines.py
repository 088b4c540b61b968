#!/usr/bin/env python
"""Per-pixel vs. mask classification on the synthetic shapes dataset, for the same CPU budget.

Trains every config with the same iterations, batch, image size and threads (each run is a
``tools/train.py`` process), evaluates it once at the end, and writes a table of mIoU, PQ (mask
classification only), parameters and seconds per iteration::

    python tools/compare_baselines.py                                  # configs/demo/baselines, 4000 its (the demo's)
    python tools/compare_baselines.py --max-iter 3000 --jobs 1 --threads 2
    python tools/compare_baselines.py --configs configs/demo/baselines/per_pixel_baseline.yaml \\
        configs/demo/shapes_tiny.yaml solver.base_lr=3e-4              # overrides apply to every run
    python tools/compare_baselines.py --table-only                     # rebuild the table from finished runs

The configs in ``configs/demo/baselines/`` inherit ``configs/demo/shapes_tiny.yaml``, so a rerun
measures them on the demo config as it is then. Budget overrides added to every run:
``solver.max_iter``, ``train.num_threads``, ``data.num_workers=0`` (data loading inside the
measured process, one thread in all), ``train.eval_period=0`` (evaluate once, at the end) and
``train.checkpoint_period=0``. Seconds per iteration are the median of the trainer's 20-iteration
averages (robust to load spikes from other processes) and include data loading; the machine's
load average is sampled during the runs and reported with the table.

Writes ``<output-dir>/<config stem>/`` (each run), ``comparison.json`` and ``comparison.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maskformer.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIGS = [
    REPO / "configs" / "demo" / "baselines" / "per_pixel_baseline.yaml",
    REPO / "configs" / "demo" / "baselines" / "per_pixel_baseline_plus.yaml",
    REPO / "configs" / "demo" / "baselines" / "maskformer_fixed.yaml",
    REPO / "configs" / "demo" / "baselines" / "maskformer_bipartite.yaml",
]
DEFAULT_OUTPUT = REPO / "outputs" / "compare_baselines"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS,
                        help="configs to compare (default: the four of configs/demo/baselines/)")
    parser.add_argument("--max-iter", type=int, default=4000, help="iterations of every run (default 4000, the demo's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time (default 2)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    parser.add_argument("--table-only", action="store_true", help="do not train; tabulate the runs already there")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides applied to every run (after the budget overrides)")
    args = parser.parse_args(argv)
    if args.max_iter < 1 or args.threads < 1 or args.jobs < 1:
        parser.error("--max-iter, --threads and --jobs must be >= 1")
    stems = [c.stem for c in args.configs]
    if len(set(stems)) != len(stems):
        parser.error(f"the configs' file names must differ (each run's folder is named after it): {stems}")
    return args


def budget_overrides(max_iter: int, threads: int) -> list[str]:
    return [f"solver.max_iter={max_iter}", f"train.num_threads={threads}", "data.num_workers=0",
            "train.eval_period=0", "train.checkpoint_period=0", "train.log_period=20"]


class LoadSampler:
    """Samples the 1-minute load average every ``period`` seconds in a background thread."""

    def __init__(self, period: float = 15.0):
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"mean": statistics.fmean(self.samples), "min": min(self.samples), "max": max(self.samples),
                "samples": len(self.samples), "cpus": os.cpu_count()}


def run_all(configs: list[Path], overrides: list[str], output_dir: Path, jobs: int, threads: int) -> dict[str, int]:
    """Train every config in its own ``tools/train.py`` process, ``jobs`` at a time; returns exit codes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = list(configs)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            run_dir = output_dir / config.stem
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "stdout.txt", "w")
            cmd = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(config),
                   "--output-dir", str(run_dir), *overrides]
            print(f"start {config.stem}: {' '.join(cmd[1:])}", flush=True)
            running[config.stem] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        time.sleep(2.0)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                print(f"done  {name}: exit code {proc.returncode}", flush=True)
                del running[name]
    return codes


def count_parameters(config: Path, overrides: list[str]) -> int:
    from maskformer.models.build import build_maskformer

    model = build_maskformer(load_config(config, overrides))
    return sum(p.numel() for p in model.parameters())


def summarize_run(config: Path, run_dir: Path, max_iter: int, overrides: list[str]) -> dict:
    """One table row from a finished run's folder (``status`` says why a row has no numbers)."""
    cfg = load_config(config, overrides)
    m = cfg.model
    row = {"config": str(config), "name": config.stem, "architecture": m.architecture,
           "matcher": cfg.loss.matcher if m.architecture == "maskformer" else "-",
           "queries": m.num_queries if m.architecture != "per_pixel_baseline" else None,
           "parameters": count_parameters(config, overrides), "iterations": max_iter}
    eval_file = run_dir / "eval" / f"iter_{max_iter:07d}.json"
    metrics_file = run_dir / "metrics.jsonl"
    if not eval_file.is_file() or not metrics_file.is_file():
        return {**row, "status": f"no finished run in {run_dir} (missing {eval_file.name} or metrics.jsonl)"}
    metrics = json.loads(eval_file.read_text())
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    # The trainer logs 20-iteration averages; the first one includes start-up.
    times = [r["time"] for r in train_rows if r["iteration"] > 1]
    data_times = [r["data_time"] for r in train_rows if r["iteration"] > 1]
    last = train_rows[-1] if train_rows else {}
    sem, pan = metrics.get("sem_seg", {}), metrics.get("panoptic_seg", {})
    return {**row, "status": "ok", "mIoU": sem.get("mIoU"), "PQ": pan.get("PQ"), "PQ_th": pan.get("PQ_th"),
            "PQ_st": pan.get("PQ_st"),
            "seconds_per_iter": statistics.median(times) if times else None,
            "data_seconds_per_iter": statistics.median(data_times) if data_times else None,
            "train_minutes": last.get("elapsed", float("nan")) / 60, "final_loss": last.get("total_loss")}


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    head = ("| config | architecture | matching | N | params | mIoU | PQ | PQ_th | PQ_st | s/it | data s/it | "
            "final loss |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r['architecture']} | {r['matcher']} | {_fmt(r['queries'])} | "
                         f"{r['parameters']:,} | {r.get('status')} |  |  |  |  |  |  |")
            continue
        lines.append(f"| {r['name']} | {r['architecture']} | {r['matcher']} | {_fmt(r['queries'])} | "
                     f"{r['parameters']:,} | {_fmt(r['mIoU'])} | {_fmt(r['PQ'])} | {_fmt(r['PQ_th'])} | "
                     f"{_fmt(r['PQ_st'])} | {_fmt(r['seconds_per_iter'], 3)} | "
                     f"{_fmt(r['data_seconds_per_iter'], 3)} | {_fmt(r['final_loss'], 3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = budget_overrides(args.max_iter, args.threads) + list(args.overrides)
    try:
        for config in args.configs:
            load_config(config, overrides)  # every config and override checked before anything runs
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    load: dict = {}
    codes: dict[str, int] = {}
    started = time.time()
    if not args.table_only:
        from maskformer.data import build_dataset

        cfg = load_config(args.configs[0], overrides)
        # Generate the data once, before (and outside the timings of) the runs.
        build_dataset(cfg, "train")
        build_dataset(cfg, "test")
        with LoadSampler() as sampler:
            codes = run_all(args.configs, overrides, args.output_dir, args.jobs, args.threads)
        load = sampler.summary()
    rows = [summarize_run(c, args.output_dir / c.stem, args.max_iter, overrides) for c in args.configs]
    for r in rows:
        if r["name"] in codes and codes[r["name"]] != 0:
            r["status"] = f"failed (exit code {codes[r['name']]}; see {args.output_dir / r['name'] / 'stdout.txt'})"
    command = "python tools/compare_baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command.strip(), "budget_overrides": overrides, "max_iter": args.max_iter,
              "threads": args.threads, "jobs": args.jobs, "load_average": load,
              "wall_minutes": (time.time() - started) / 60, "rows": rows}
    (args.output_dir / "comparison.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(rows)
    load_text = (f"load average (1 min) during the runs: mean {load['mean']:.2f}, min {load['min']:.2f}, "
                 f"max {load['max']:.2f} on {load['cpus']} CPUs" if load else "load average: not measured")
    (args.output_dir / "comparison.md").write_text(
        f"`{report['command']}`\n\n{args.max_iter} iterations, {args.threads} thread(s) per run, {args.jobs} "
        f"run(s) at a time; {load_text}.\n\n{table}\n")
    print(table)
    print(load_text)
    print(f"written: {args.output_dir / 'comparison.json'}, {args.output_dir / 'comparison.md'}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
