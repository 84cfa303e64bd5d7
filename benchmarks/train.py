"""Training throughput (samples/s) of blip_repro.train on this machine, 1 process vs 2 (torchrun, gloo on CPU).

    python benchmarks/train.py                      # tiny-blip and a BLIP-base-size model, a few steps each
    python benchmarks/train.py --models tiny --steps 30

Each run is the real command (`python -m blip_repro.train` / `torchrun --nproc_per_node=2 -m blip_repro.train`) on
a JSON list of shapes images, with random weights: tiny-blip (263k parameters, 64 px) and a BLIP-base-size captioner
(BlipConfig defaults: ViT-B/16 at 384 px + 12-layer BERT decoder, 224M parameters). The batch per process is fixed,
so 2 processes see twice the samples per step. Throughput is measured from the training log between the end of the
first step (warm-up excluded) and the last, i.e. without start-up and model loading. One process uses all cores
(torch threads = cores); each of 2 processes uses cores / 2, as torchrun sets it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from blip_repro import tiny  # noqa: E402
from blip_repro.tasks import captioning  # noqa: E402

MODELS = {"tiny": dict(batch=16, steps=20), "base": dict(batch=2, steps=4)}


def _blip_base(folder: Path) -> Path:
    """Random BLIP-base-size captioner (the shapes tokenizer; a 384-px image processor)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    tok = tiny.processor("shapes-bert").tokenizer
    cfg = BlipConfig(text_config=dict(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                      sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id),
                     vision_config=dict(initializer_range=0.02))
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    BlipProcessor(image_processor=tiny._image_processor(384), tokenizer=tok).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(params: Path, nproc: int, out: Path) -> dict:
    cores = os.cpu_count() or 1
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                                                    f"--master_port={_free_port()}"]
    cmd = launcher + ["-m", "blip_repro.train", "--params", str(params), f"output_dir={out}",
                      f"num_threads={max(1, cores // nproc)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    start = next(r for r in recs if r.get("event") == "start")
    global_batch = yaml.safe_load(params.read_text())["batch_size"] * start["world_size"]
    seconds = steps[-1]["time_s"] - steps[0]["time_s"]
    return {"samples_per_s": (len(steps) - 1) * global_batch / seconds, "s_per_step": seconds / (len(steps) - 1),
            "params": start["trainable_params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: 20 tiny, 4 base)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ann = captioning.example_json_list(work / "captions.json", limit=2000)
    print(f"CPU cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.1f}")
    print("| model | parameters | processes | batch/process | s/step | samples/s |\n|---|---|---|---|---|---|")
    for name in args.models:
        folder = tiny.build("tiny-blip", save_to=work / "tiny") if name == "tiny" else _blip_base(work / "base")
        batch, steps = MODELS[name]["batch"], args.steps or MODELS[name]["steps"]
        params = work / f"{name}.yaml"
        params.write_text(yaml.safe_dump(dict(task="captioning", model=str(folder), dataset="json",
                                              ann_file=str(ann), max_steps=steps, batch_size=batch, lr=1e-4,
                                              log_every=1)))
        for nproc in (1, 2):
            r = _run(params, nproc, work / f"{name}-{nproc}")
            print(f"| {name} | {r['params'] / 1e6:.2f}M | {nproc} | {batch} | {r['s_per_step']:.3f} | "
                  f"{r['samples_per_s']:.1f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}; work folder {work}")


if __name__ == "__main__":
    main()
