"""Data parallel (DDP) and fully-sharded (FSDP) training through PyTorch's own engine, activated by torchrun."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.train.config import CHOICES


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        """A progress line on stderr, from the main process only."""
        if self.main:
            print(msg, file=sys.stderr)


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def one_process(command: str) -> None:
    """Refuse a launch of several processes (torchrun) for a command that would run whole in each of them."""
    if launched_world() > 1:
        raise LMForgeError(f"{command} runs in one process: not under torchrun (WORLD_SIZE={launched_world()})")


def check_mode(mode: str, stage: str) -> None:
    """Before anything loads: the fine-tuning stages run data-parallel only. Their final steps (merging adapters,
    fitting and normalising a reward head, storing reference log-probs) work on a whole model in one process,
    which FSDP never holds."""
    check_not_none(mode, "use ddp")
    if launched_world() > 1 and mode == "fsdp":
        raise LMForgeError(f"{stage}: train.distributed=fsdp shards pretraining only (lmforge pretrain); "
                           f"fine-tuning commands run data-parallel: --train.distributed ddp")


def check_not_none(mode: str, instead: str = "use ddp or fsdp") -> None:
    """``train.distributed none`` under torchrun trained a replica in each process, never synchronised, each on its
    share of the data, and saved the first one: refused (``instead``: what the command can do)."""
    if launched_world() > 1 and mode == "none":
        raise LMForgeError(f"train.distributed=none under torchrun (WORLD_SIZE={launched_world()}): each process would "
                           f"train a replica of its own on its share of the data; {instead}, or run one process")


def pick_device(name: str) -> torch.device:
    """``--device``: auto (CUDA when present, else the CPU) or a torch device name; a bad name is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise LMForgeError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError(f"--device {name}: no CUDA device here (this torch {torch.__version__} "
                           f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LMForgeError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LMForgeError(f"--device {name}: MPS is not available here; use cpu")
    return dev


def start(device: str) -> tuple[torch.device, Dist]:
    """A training stage's device and process group: ``pick_device``, then ``init``; under torchrun on CUDA each
    process takes the GPU of its local rank."""
    dev = pick_device(device)
    d = init(dev)
    if d.enabled and dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
    return dev, d


def init(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    world = launched_world()
    if world <= 1:
        return Dist()
    if "RANK" not in os.environ:
        raise LMForgeError(f"WORLD_SIZE={world} is set but RANK is not: launch the processes with torchrun, or unset "
                           "WORLD_SIZE")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local)


def wrap(model: nn.Module, d: Dist, mode: str, device: torch.device) -> nn.Module:
    """DDP (replicated weights, averaged gradients) or FSDP (ZeRO-3: parameters, gradients and optimizer state
    sharded across ranks, gathered per block for compute)."""
    check_not_none(mode)
    if not d.enabled:
        return model
    if mode in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise LMForgeError(f"train.distributed={mode!r}: allowed values are {list(CHOICES['distributed'])}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def mean(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / d.world


def sum_all(values: list[float], d: Dist) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sum_dict(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Per-key sums over all ranks; a key some rank lacks counts 0 there (a rank may have had nothing to count)."""
    if not d.enabled:
        return dict(values)
    names: list[list[str]] = [[] for _ in range(d.world)]
    dist.all_gather_object(names, sorted(values))
    keys = sorted({k for n in names for k in n})
    return dict(zip(keys, sum_all([values.get(k, 0.0) for k in keys], d)))


def broadcast_module(module: nn.Module, d: Dist) -> None:
    """Every parameter and buffer of ``module`` from the first process to the others (in place)."""
    if not d.enabled:
        return
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            dist.broadcast(t.data, src=0)


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """``obj`` of every rank, in rank order (on every rank)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_gather_list(mine: list, d: Dist) -> list:
    """The items every rank holds of a list dealt out as ``items[rank::world]``, back in their original order."""
    if not d.enabled:
        return list(mine)
    parts: list[list] = [[] for _ in range(d.world)]
    dist.all_gather_object(parts, mine)
    out = [None] * sum(map(len, parts))
    for r, part in enumerate(parts):
        out[r :: d.world] = part
    return out


def map_shards(fn, items: list, d: Dist) -> list:
    """``fn`` (a list -> one result per item) on this rank's share ``items[rank::world]``; the results of every
    rank, back in the items' order."""
    part = items[d.rank :: d.world]
    return all_gather_list(fn(part) if part else [], d)


def reshard(model: nn.Module) -> None:
    """Drop FSDP's unsharded copies of the parameters (the root keeps its own after a forward), so that the next
    forward gathers the shards again: needed after the sharded parameters were overwritten in place."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank calls it); plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist):
    """Unsharded model and optimizer state dicts on CPU (every rank calls; rank 0 writes)."""
    if not d.enabled:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(unwrap(model), optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, msd, osd, d: Dist) -> None:
    if not d.enabled:
        unwrap(model).load_state_dict(msd, strict=False)
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
    set_state_dict(unwrap(model), optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)
    reshard(unwrap(model))  # FSDP: gathered copies from an earlier forward are stale now


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


KEEP_GROUP = "LMFORGE_KEEP_PROCESS_GROUP"  # set by `lmforge pipeline`: its training stages share one process group


def cleanup(d: Dist) -> None:
    """Leave the process group at the end of a run (kept when a pipeline runs more training stages after it: a
    torchrun launch cannot join a new group on the same store). After a run that ended normally every rank waits
    for the others first: a rank that closed its connections while a peer still had work in flight could abort the
    peer at exit (gloo: "terminate called without an active exception"). A rank leaving on an exception does not
    wait (its peers may never arrive)."""
    if d.enabled and dist.is_initialized() and not os.environ.get(KEEP_GROUP):
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()
