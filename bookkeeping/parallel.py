"""Several processes for train.py under torchrun: the process group and the few collectives it needs.

    torchrun --nproc_per_node 4 train.py --stage all

torchrun starts one process per device and tells each its place in the environment (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). init() joins the group: nccl on CUDA, each process on
cuda:LOCAL_RANK; gloo on CPU. Without torchrun (WORLD_SIZE unset or 1) there is no group, and every
function below is the one-process identity: rank 0 of 1, no-op barrier, a gather returns its input.
Collectives send tensors only (no pickled objects); on CUDA they live on the process's GPU, as
nccl requires.
"""

import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def init(device):
    """Join torchrun's process group when WORLD_SIZE > 1; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def shutdown():
    """Leave the process group, if any. Objects that use it must be gone first: a DistributedDataParallel
    wrapper sits in reference cycles, so the collector frees it now rather than at exit, when its
    reducer would run on a group already destroyed (gloo then aborts the process)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank():
    """This process's rank, 0 without a group."""
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    """Number of processes, 1 without a group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """True on rank 0, the process that writes files and prints."""
    return rank() == 0


def wrap(model):
    """The model as training runs it: under a group, a DistributedDataParallel wrapper whose backward
    all-reduces the gradients (averaged over processes); without one, the model itself."""
    if not dist.is_initialized() or world() == 1:
        return model
    device = next(model.parameters()).device
    return DDP(model, device_ids=[device] if device.type == "cuda" else None)


def barrier():
    """Wait until every process gets here (e.g. for a file rank 0 writes)."""
    if dist.is_initialized():
        dist.barrier()


def shard(n):
    """This rank's contiguous slice of n items; ranks in order cover 0..n, sizes differ by <= 1."""
    return slice(n * rank() // world(), n * (rank() + 1) // world())


def all_reduce_sum(x):
    """x summed over all processes, in place (x must live on the process's device)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def gather_1d(x):
    """Every rank's 1-D tensor x, lengths may differ -> list in rank order: gather lengths, then padded x."""
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    padded = x.new_zeros(max(1, max(int(s) for s in sizes)))  # [longest]
    padded[:x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return [p[:int(s)] for p, s in zip(parts, sizes)]


def gather_rows(rows, dtype, device):
    """Every rank's list of 1-D tensors, concatenated in rank order on every rank (CPU tensors)."""
    if not dist.is_initialized():
        return [r.to("cpu", dtype) for r in rows]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)  # [n_rows]
    values = torch.cat([r.to(device, dtype) for r in rows]) if rows else \
        torch.zeros(0, dtype=dtype, device=device)
    out = []
    for lens, vals in zip(gather_1d(lengths), gather_1d(values)):
        out += vals.cpu().split(lens.tolist())
    return out
