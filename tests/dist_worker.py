"""One rank of the distributed tests: `torchrun --nproc_per_node=2 tests/dist_worker.py <mode> <outdir>`.

Each rank writes `<outdir>/<mode>_rank<r>.json`; tests/test_dist.py compares them with single-process results.
Modes: all (every collective), shard (small; used for the srun-style launch), atexit (like shard but leaves the
group to the atexit hook), mismatch (a gather whose count is wrong, uncaught: both ranks must exit with the message).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from blip_repro import dist
from blip_repro.fileio import atomic_write_json

N = 7  # odd, so the two ranks hold 4 and 3 items
BATCH, DIM = 3, 4


def grad_case_inputs() -> torch.Tensor:
    """The concatenated batch of both ranks (rank r holds rows r*BATCH:(r+1)*BATCH)."""
    return torch.randn(2 * BATCH, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def contrastive_loss(local: torch.Tensor, gathered: torch.Tensor, offset: int) -> torch.Tensor:
    """ITC-like: local rows against all gathered rows, positives on the diagonal block; plus a term on all rows."""
    logits = local @ gathered.T / 0.1
    targets = torch.arange(local.shape[0]) + offset
    return F.cross_entropy(logits, targets, reduction="sum") + 0.01 * (gathered**2).sum()


def _run_grad(rank: int) -> dict:
    x = grad_case_inputs()[rank * BATCH : (rank + 1) * BATCH].clone().requires_grad_(True)
    loss = contrastive_loss(x, dist.all_gather_with_grad(x), rank * BATCH)
    loss.backward()
    return {"loss": loss.item(), "grad": x.grad.tolist()}


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except RuntimeError as e:
        return str(e)
    return ""


def _tensor_rows(indices: range) -> torch.Tensor:
    # An empty shard built the careless way (float, 1-D): gather_tensor_sharded must cope.
    return torch.stack([torch.arange(3) + 10 * i for i in indices]) if len(indices) else torch.zeros(0)


def run_all(state: dist.DistState) -> dict:
    mine = dist.shard(N)
    items = [f"s{i}" for i in mine]
    return {
        "world_info": list(dist.world_info()),
        "state": [state.rank, state.local_rank, state.world_size, str(state.device), state.is_main],
        "initialized": dist.is_initialized(),
        "shard": list(mine),
        "gather_sharded": dist.gather_sharded(items, N),
        "gather_objects": dist.gather_objects([state.rank] * (state.rank + 1)),
        "gather_sharded_error": _error_of(dist.gather_sharded, items, N + 1),
        "tensor_7": dist.gather_tensor_sharded(_tensor_rows(mine), N).tolist(),
        "tensor_1": dist.gather_tensor_sharded(_tensor_rows(dist.shard(1)), 1).tolist(),  # rank 1 holds none
        "tensor_error": _error_of(dist.gather_tensor_sharded, _tensor_rows(mine), N - 1),
        "grad": _run_grad(state.rank),
        "concat": dist.concat_all_gather(torch.tensor([state.rank, 10 + state.rank])).tolist(),
        "all_reduce": dist.all_reduce_sum(torch.tensor([state.rank + 1.0])).tolist(),
        "broadcast": dist.broadcast_object({"from": state.rank}),
    }


def run_shard(state: dist.DistState) -> dict:
    return {"state": [state.rank, state.local_rank, state.world_size, str(state.device), state.is_main],
            "initialized": dist.is_initialized(),
            "gather_sharded": dist.gather_sharded([f"s{i}" for i in dist.shard(N)], N)}


def main() -> None:
    mode, outdir = sys.argv[1], Path(sys.argv[2])
    state = dist.init()
    try:
        if mode == "mismatch":
            dist.gather_sharded(list(dist.shard(N)), N + 1)  # raises on every rank
        result = {"all": run_all, "shard": run_shard, "atexit": run_shard}[mode](state)
        dist.barrier()
        atomic_write_json(outdir / f"{mode}_rank{state.rank}.json", result)
    finally:
        if mode != "atexit":
            dist.shutdown()


if __name__ == "__main__":
    main()
