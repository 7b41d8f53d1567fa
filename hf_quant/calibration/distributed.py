"""Data-parallel calibration on torch.distributed (gloo on CPUs, NCCL on GPUs; launched by `torchrun` or
`accelerate launch`). Without an initialised process group every function is the one-process identity.

- The calibration windows are split across ranks (`my_windows`: rank r takes windows r, r + N, ...); each
  rank captures and propagates only its own windows' activations.
- Statistics are summed over ranks in fp64 (`all_reduce_sum`): each rank's Hessian sum X X^T (fp32, as one
  process accumulates it) is added in fp64 and rounded once to fp32, so the result differs from a one-process
  run only by the order of the fp32 additions inside each rank (a few codes may flip; tests/test_streaming.py
  measures it).
- The layers of a block are spread over the ranks (`owner`), each quantized by one rank and broadcast to the
  others (`broadcast_layers`), so every rank holds the same quantized block to compute its windows' next inputs.
- A block stage (AWQ's scale search) works on the run's first reference windows, each rank on its own of them
  (`first_windows`); what it observes and the errors it compares are summed over ranks, so every rank makes the
  same choice, the one a single process makes up to the order of the additions. A stage that trains (OmniQuant)
  spreads each step's windows over the ranks and sums their gradients (`all_reduce_sum`), so every rank takes
  the same optimizer step.
- Only rank 0 writes files (`is_main`); `barrier` orders the rest.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group a launcher (torchrun, accelerate launch) describes in the environment
    (WORLD_SIZE > 1): NCCL where there are GPUs, else gloo. Returns whether a group is active."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return active()


def my_windows(windows: Any) -> Any:
    """This rank's share of the calibration windows (a tensor of token windows, or a list of whole samples; all of
    them in one process)."""
    if not active():
        return windows
    if len(windows) < world():
        raise ValueError(f"QuantConfig.num_samples={len(windows)} is smaller than the {world()} processes "
                         "calibrating together; use at least one window per process.")
    return windows[rank()::world()]


def first_windows(n: int, local: int) -> int:
    """How many of this rank's `local` windows are among the first `n` windows of the whole run (rank r holds
    windows r, r + N, ...): the reference windows a block stage searches on, the same set as in one process."""
    if not active():
        return min(n, local)
    return min(local, max(0, -(-(n - rank()) // world())))


def _device_for(t: torch.Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` replaced in place by its sum over ranks, added in fp64 and rounded once to t's dtype."""
    if not active():
        return t
    acc = t.to(_device_for(t), torch.float64)
    dist.all_reduce(acc)
    t.copy_(acc.to(t.device))
    return t


def all_reduce_scalars(*values: float) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device_for(torch.empty(0)))
    dist.all_reduce(t)
    return t.tolist()


def owner(index: int) -> int:
    """The rank that quantizes the `index`-th layer of a block."""
    return index % world()


def broadcast_layers(layers: dict[str, Any], owners: dict[str, int]) -> dict[str, Any]:
    """Every rank gets every layer: each from the rank that `owners` names (in the order of `owners`)."""
    if not active():
        return layers
    out = {}
    for name, src in owners.items():
        box = [layers.get(name) if rank() == src else None]
        dist.broadcast_object_list(box, src=src)
        out[name] = box[0]
    return out


def barrier() -> None:
    if active():
        dist.barrier()
