"""finetune(config): the one training loop for every task — one process, torchrun or srun (DDP on torch.distributed).

    python -m blip_repro.train --params params/finetune/shapes_caption.yaml
    torchrun --nproc_per_node=4 -m blip_repro.train --params params/finetune/coco_caption_blip.yaml

Batches are cut from one seeded permutation per epoch: global step s of epoch e takes the
`batch_size * world * grad_accum` items after position s of that permutation, and rank r its own slice — so the
data order does not depend on the number of processes, and a resumed run continues with the very next batch.
A checkpoint (model, optimizer, schedule, scaler, RNG states) is written atomically every epoch, every
`save_every_steps`, and when SIGTERM or SIGUSR1 arrives (a preempted Slurm job), after which the process exits so
that the requeued job resumes from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from blip_repro import dist
from blip_repro.errors import UserError
from blip_repro.fileio import atomic_write_json
from blip_repro.runs import config_from, load_params, outputs_root


@dataclass
class TrainConfig:
    task: str  # captioning (more tasks: see blip_repro.tasks.TRAINABLE)
    model: str  # zoo name, tiny-* name or a local HF checkpoint folder to start from
    init: str = "pretrained"  # pretrained | random (tiny models are built from their config)
    dataset: str = "shapes"  # shapes | coco | json (your own JSON list of {"image", "caption"})
    split: str = "train"
    ann_file: str | None = None  # dataset=json: the JSON list; image paths relative to image_root
    image_root: str | None = None
    output_dir: str = ""  # default outputs/train/<model>-<task>-<dataset>
    epochs: int | None = None  # either epochs or max_steps
    max_steps: int | None = None
    batch_size: int = 32  # per process
    grad_accum: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    warmup_steps: int = 0
    warmup_lr: float = 0.0  # LAVIS warms up linearly from warmup_lr (1e-8 in BLIP-2 recipes)
    weight_decay: float = 0.05  # AdamW, decoupled; none on biases, norms and embeddings
    schedule: str = "cosine"  # cosine (per step, after warm-up) | epoch_cosine (BLIP's per-epoch cosine)
    grad_clip: float | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16 (with a grad scaler)
    grad_checkpointing: bool = False
    freeze_vision: bool = False
    label_smoothing: float = 0.1  # BLIP's LM loss (protocols.md §1.1)
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads (pinned for bitwise-repeatable CPU runs)
    save_every_steps: int = 0
    log_every: int = 50
    limit: int | None = None  # first N training records

    def __post_init__(self):
        from blip_repro.runs import _check_type

        from dataclasses import fields

        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if (self.epochs is None) == (self.max_steps is None):
            raise UserError("set exactly one of 'epochs' and 'max_steps'")
        if self.schedule not in ("cosine", "epoch_cosine"):
            raise UserError(f"parameter 'schedule': {self.schedule!r} is not one of cosine, epoch_cosine")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"parameter 'precision': {self.precision!r} is not one of fp32, bf16, fp16")

    @property
    def out(self) -> Path:
        return Path(self.output_dir) if self.output_dir else \
            outputs_root() / "train" / f"{Path(self.model).name}-{self.task}-{self.dataset}"


class _Stop:
    """Set by SIGTERM/SIGUSR1: finish the current step, checkpoint, exit (Slurm preemption)."""
    requested = False

    @classmethod
    def install(cls):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda *_: setattr(cls, "requested", True))


def finetune(cfg: TrainConfig) -> dict:
    from blip_repro import tasks

    state = dist.init()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = tasks.get(cfg.task)
    if not hasattr(task, "train_examples"):
        raise UserError(f"task {cfg.task!r} has no training loss yet")
    out = cfg.out
    _seed_everything(cfg.seed + state.rank)
    model, processor = _initial_model(cfg, state.device)
    family = _family(model)
    examples = task.train_examples(cfg, processor)
    world, micro = state.world_size, cfg.batch_size
    per_step = micro * world * cfg.grad_accum
    steps_per_epoch = len(examples) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{len(examples)} training records are fewer than one step's {per_step} "
                        f"(batch_size x processes x grad_accum)")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.freeze_vision:
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total, steps_per_epoch))
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16")
    start = _resume(out, cfg, model, optimizer, scheduler, scaler)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if state.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "train_config.json", asdict(cfg))
        if world == 1 and cfg.task == "retrieval":
            print("note: world size 1, so ITM hard negatives come from the local batch only (protocols.md §1.9)")
    _Stop.install()
    log = _Log(out / "log.jsonl", state.is_main)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=f"train {cfg.model} {cfg.task}", disable=not state.is_main,
               mininterval=2)
    step, t0 = start, time.time()
    model.train()
    autocast = _autocast(cfg, state.device)
    while step < total:
        epoch, s = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        base = s * per_step
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            lo = base + (m * world + state.rank) * micro
            batch = task.train_batch_for(processor, [examples[int(i)] for i in order[lo:lo + micro]], cfg, family)
            batch = {k: v.to(state.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = m == cfg.grad_accum - 1 or world == 1
            with (ddp.no_sync() if not sync else _null()), autocast:
                loss = task.train_loss(ddp, batch, cfg) / cfg.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            log.write(step=step, epoch=epoch, loss=round(loss_sum, 5), lr=scheduler.get_last_lr()[0],
                      time_s=round(time.time() - t0, 2))
        end_of_epoch = step % steps_per_epoch == 0
        stop = _agree(_Stop.requested)
        if stop or end_of_epoch or (cfg.save_every_steps and step % cfg.save_every_steps == 0):
            _save(out, cfg, model, optimizer, scheduler, scaler, step, state.is_main)
        if stop and step < total:
            bar.close()
            log.write(step=step, event="stopped by signal; checkpoint saved, resume by re-running")
            dist.shutdown()
            raise SystemExit(0 if os.environ.get("SLURM_JOB_ID") is None else 143)
    bar.close()
    if state.is_main:
        model.eval()
        model.save_pretrained(out / "model")
        processor.save_pretrained(out / "model")
        from blip_repro import report

        report.loss_figure(out / "log.jsonl", out / "loss")
    dist.barrier()
    return {"steps": step, "output_dir": str(out), "log": str(out / "log.jsonl")}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _autocast(cfg, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def _agree(flag: bool) -> bool:
    """Every rank stops at the same step when any rank got the signal."""
    t = dist.all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))
    return bool(t.item() > 0)


def _initial_model(cfg: TrainConfig, device):
    from blip_repro import tiny, zoo

    if cfg.init == "random":
        model, processor = tiny.build(cfg.model, seed=cfg.seed)
    elif cfg.init == "pretrained":
        model, processor = zoo.load_model(cfg.model, device=str(device))
    else:
        raise UserError(f"parameter 'init': {cfg.init!r} is not one of pretrained, random")
    return model.to(device), processor


def _family(model) -> str:
    from blip_repro.zoo import family_of

    return family_of(model)


def _optimizer(model, cfg: TrainConfig):
    """AdamW with decoupled weight decay, none on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "norm" in name.lower() or "embedding" in name.lower()
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def _lr_lambda(cfg: TrainConfig, total: int, steps_per_epoch: int):
    """Multiplier of cfg.lr at a step: linear warm-up, then cosine to min_lr_ratio (LAVIS linear_warmup_cosine_lr),
    or BLIP's cosine_lr_schedule, constant within an epoch (protocols.md §1.8)."""
    lo, w = cfg.min_lr_ratio, cfg.warmup_steps
    start = cfg.warmup_lr / cfg.lr if cfg.lr else 0.0

    def f(step: int) -> float:
        if step < w:
            return start + (1 - start) * step / w
        if cfg.schedule == "epoch_cosine":
            epochs = max(1, math.ceil(total / steps_per_epoch))
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / epochs))
        t = (step - w) / max(1, total - w)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _save(out: Path, cfg, model, optimizer, scheduler, scaler, step: int, is_main: bool) -> None:
    ckpt = {"step": step, "config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
    states = dist.gather_objects([_rng_state()])  # every rank's RNG, so each resumes its own stream
    if is_main:
        ckpt["rng"] = states
        tmp = out / f".checkpoint.pt.{os.getpid()}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, out / "checkpoint.pt")  # atomic: a kill never leaves a half-written checkpoint
    dist.barrier()


def _resume(out: Path, cfg, model, optimizer, scheduler, scaler) -> int:
    f = out / "checkpoint.pt"
    if not f.exists():
        return 0
    ckpt = torch.load(f, map_location="cpu", weights_only=False)
    old = ckpt.get("config", {})
    for key in ("model", "task", "dataset", "batch_size", "grad_accum", "lr", "seed"):
        if old.get(key) != getattr(cfg, key):
            raise UserError(f"{f} was written by another run ({key}={old.get(key)!r}, now {getattr(cfg, key)!r}); "
                            f"use another output_dir or delete the checkpoint")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{f} does not match model {cfg.model} ({str(e).splitlines()[0]})") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"][dist.rank()] if dist.rank() < len(ckpt["rng"]) else ckpt["rng"][0]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    import numpy as np

    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(ckpt["step"])


class _Log:
    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active

    def write(self, **rec) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def main(argv: list[str] | None = None) -> int:
    import yaml

    ap = argparse.ArgumentParser(prog="python -m blip_repro.train", description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True, help="YAML file of TrainConfig fields (params/finetune/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (YAML values)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    for kv in args.overrides:
        k, _, v = kv.partition("=")
        params[k] = yaml.safe_load(v)
    result = finetune(config_from(TrainConfig, params, args.params))
    if dist.is_main():
        print(json.dumps(result, indent=2))
    dist.shutdown()
    return 0


if __name__ == "__main__":
    from blip_repro.cli import run_main

    raise SystemExit(run_main(main))
