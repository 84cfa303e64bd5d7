"""evaluate(config): the one evaluation loop — sharded over ranks, resumable, gathered exactly.

Each rank predicts the records `range(rank, N, world)` that no earlier (possibly killed) attempt finished, appending
one JSON line per record to its own part file (flushed and fsynced per batch). Rank 0 then merges every part,
asserts that each record was predicted exactly once, writes predictions.jsonl in record order, scores it and writes
metrics.json (with the number of scored records) and provenance.json atomically.

    python -m blip_repro.evaluate --params params/captioning/blip-base-caption.yaml
    torchrun --nproc_per_node=4 -m blip_repro.evaluate --params ...
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from blip_repro import dist, tasks, zoo
from blip_repro.errors import UserError
from blip_repro.fileio import atomic_write_json, atomic_write_text
from blip_repro.runs import EvalConfig, eval_configs_from_file


def evaluate(cfg: EvalConfig) -> dict:
    t0 = time.time()
    state = dist.init()
    task = tasks.get(cfg.task)
    run_dir = cfg.run_dir
    if state.is_main:
        claim_run_dir(run_dir, cfg.to_dict(), ignore=("batch_size",))
    dist.barrier()
    if hasattr(task, "evaluate_run"):  # tasks whose predictions are not one per record (retrieval)
        metrics = task.evaluate_run(cfg, run_dir, state)  # writes its own predictions and provenance
        if state.is_main:
            metrics["run_id"] = cfg.run_id
            atomic_write_json(run_dir / "metrics.json", metrics)
        return dist.broadcast_object(metrics)
    recs = task.records(cfg)
    keys = [r[task.KEY] for r in recs]
    if len(set(keys)) != len(keys):
        raise UserError(f"{cfg.dataset}/{cfg.split}: duplicate record ids in the annotation file")
    done = read_predictions(run_dir, task.KEY)
    todo = [recs[i] for i in dist.shard(len(recs)) if keys[i] not in done]
    model, processor = zoo.load_model(cfg.model, cfg.device, cfg.dtype)
    family = zoo.family_of(model)
    part = run_dir / f"predictions.part-r{state.rank}-w{state.world_size}.jsonl"
    _predict_to(part, todo, lambda b: task.predict_records(model, processor, b, cfg, family), cfg.batch_size,
                state.is_main, f"{cfg.task} {Path(cfg.model).name} {cfg.dataset}")
    dist.barrier()
    metrics, failure = None, None
    if state.is_main:
        try:
            metrics = _merge_and_score(cfg, task, recs, keys, model, family, run_dir, t0)
        except Exception as e:
            # the other ranks wait in the broadcast below: tell them, so that they stop now, not at the timeout
            dist.broadcast_object((None, f"{type(e).__name__}: {e}"))
            raise
    metrics, failure = dist.broadcast_object((metrics, failure))
    if failure:
        raise UserError(f"rank 0 failed while scoring ({failure}); the predictions are kept, re-run to score them")
    return metrics


def _merge_and_score(cfg: EvalConfig, task, recs: list, keys: list, model, family: str, run_dir: Path,
                     t0: float) -> dict:
    """Rank 0: every rank's predictions into predictions.jsonl, then metrics.json and provenance.json."""
    preds = read_predictions(run_dir, task.KEY)
    missing = [k for k in keys if k not in preds]
    if missing or len(preds) != len(keys):
        raise UserError(f"{run_dir}: {len(missing)} of {len(keys)} records have no prediction "
                        f"(first: {missing[:1]}); re-run to finish them")
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(preds[k]) + "\n" for k in keys))
    metrics = task.score_run(recs, preds, cfg, family)
    metrics["n_scored"] = len(keys)
    metrics["run_id"] = cfg.run_id
    atomic_write_json(run_dir / "provenance.json", provenance(cfg, model, time.time() - t0, task))
    atomic_write_json(run_dir / "metrics.json", metrics)
    for p in run_dir.glob("predictions.part-*.jsonl"):
        p.unlink()
    return metrics


def _predict_to(part: Path, todo: list, predict, batch_size: int, show: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    _repair_tail(part)
    with open(part, "a") as f, tqdm(total=len(todo), desc=desc, disable=not show, mininterval=2) as bar:
        for i in range(0, len(todo), batch_size):
            out = predict(todo[i:i + batch_size])
            f.write("".join(json.dumps(p) + "\n" for p in out))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(out))


def _repair_tail(path: Path) -> None:
    """Drop a half-written last line left by a killed process, so appending starts on a clean line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_predictions(run_dir: Path, key: str) -> dict:
    """Predictions from every part file (any world size), first occurrence wins; torn last lines ignored."""
    out = {}
    for p in sorted(run_dir.glob("predictions.part-*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(rec[key], rec)
    return out


def claim_run_dir(run_dir: Path, config: dict, ignore: tuple = ()) -> None:
    """Write config.yaml, or check that the folder holds this same run (never mix two runs' predictions)."""
    f = run_dir / "config.yaml"
    if f.exists():
        old = yaml.safe_load(f.read_text()) or {}
        diff = [k for k in set(old) | set(config) if k not in ignore and old.get(k) != config.get(k)]
        if diff:
            raise UserError(f"{run_dir} holds another run (config differs in {sorted(diff)[0]!r}); "
                            f"choose another output folder or delete it")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f, yaml.safe_dump(config, sort_keys=False))


def provenance(cfg, model, wall_time: float, task) -> dict:
    import platform
    import resource
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from blip_repro.fileio import sha256_file

    libs = {}
    for name in ("blip_repro", "torch", "transformers", "tokenizers", "huggingface_hub", "pycocoevalcap", "spacy",
                 "numpy", "pillow", "openai"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    spec = zoo.MODELS.get(cfg.model)
    device = next(model.parameters()).device
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "run_id": cfg.run_id, "python": platform.python_version(), "libraries": libs, "git_commit": git_commit(),
        "model": {"name": cfg.model, "hub_id": spec.hub_id if spec else None,
                  "revision": spec.revision if spec else None, "class": type(model).__name__,
                  "local_folder": None if spec else str(Path(cfg.model).resolve())},
        "data_files": {str(p): sha256_file(p) for p in task.required_files(cfg) if p.exists()},
        "device": str(device), "precision": str(next(model.parameters()).dtype),
        "world_size": dist.world_size(), "wall_time_s": round(wall_time, 2),
        "peak_memory_mib": {"host_rss": round(peak, 1),
                            "gpu": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                            if torch.cuda.is_available() else None},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip_repro.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True, help="YAML file of EvalConfig fields (params/<notebook>/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (YAML values)")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.overrides:
        k, _, v = kv.partition("=")
        overrides[k] = yaml.safe_load(v)
    configs = eval_configs_from_file(args.params, overrides)  # a comma-separated model list: one run per model
    try:
        for cfg in configs:
            metrics = evaluate(cfg)
            if dist.is_main():
                print(json.dumps(metrics, indent=2, default=str))
        return 0
    finally:
        dist.shutdown()  # on every path: a gloo group alive at exit aborts rank 0 (environment.md §9)


if __name__ == "__main__":
    from blip_repro.cli import run_main

    raise SystemExit(run_main(main))
