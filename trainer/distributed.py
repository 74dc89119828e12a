"""FSDP2 for the training loop (--fsdp 1 under torchrun): sharding, full-weight saves and the sharded resume state.

Notable choices:
- One FSDP unit per decoder layer, then the root (embeddings, final norm, lm_head: a tied head stays tied).
  LoRA adapters live inside the layers they adapt, so the frozen base and its adapters shard together.
- Gradients are summed over ranks, never averaged: the loop's loss is already each rank's share of the global
  token mean, and SUM sidesteps gloo's AVG reduce-scatter, which can come out summed (PyTorch #162338).
- Every micro-batch reduce-scatters its gradients, so they stay sharded during accumulation.
- Rank 0 writes the usual files from a meta-device copy of the model filled with the gathered full state, so the
  trainers' save functions run unchanged.
- The resume state is a torch.distributed.checkpoint folder (each rank writes its own shards) plus a small meta
  file with every rank's RNG; it is written beside the old one and renamed into place, so a kill during a save
  leaves the previous one.
"""
import copy
import itertools
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from model.checkpoint import atomic_torch_save, safe_torch_load

META_FILE = "meta.pth"  # step, data position, RNG, history: what the .pth resume file holds besides the tensors


def meta_copy(model: nn.Module) -> nn.Module:
    """The model's structure and attributes with every parameter and buffer on the meta device (no memory)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, device: torch.device, dtype: torch.dtype, trainable: list) -> list:
    """fully_shard each decoder layer, then the root, in place; returns the sharded counterparts of `trainable`
    (fully_shard replaces every parameter with a DTensor, so the optimizer must get the new ones)."""
    names = {id(p): n for n, p in model.named_parameters()}
    # a list of parameters, or optimizer groups of them (LoRA+): keep the shape, swap each parameter by name
    groups = [dict(g, params=[names[id(p)] for p in g["params"]]) if isinstance(g, dict) else names[id(g)]
              for g in trainable]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute and all-gathers, fp32 gradient reduction; the CPU trains in float32 as without --fsdp.
    mixed = device.type == "cuda" and dtype != torch.float32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    params = dict(model.named_parameters())
    return [dict(g, params=[params[n] for n in g["params"]]) if isinstance(g, dict) else params[g] for g in groups]


def save_full(model: nn.Module, skeleton: Optional[nn.Module], save: Callable[[nn.Module], Path]) -> Optional[Path]:
    """Gather the full state on rank 0 (in CPU memory, one tensor at a time) and write the usual files from
    `skeleton` (rank 0's meta_copy) with `save`; every rank must call it. Returns the path on rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    skeleton.load_state_dict(full, assign=True)
    try:
        return save(skeleton)
    finally:
        skeleton.to("meta")  # frees the gathered copy until the next save


def _state(model, optimizer):
    sd_model, sd_optim = get_state_dict(model, optimizer)
    # Frozen weights (a LoRA base) are not part of the resume state: the base file holds them. Filtered here
    # because ignore_frozen_params keeps a tied lm_head.weight (it checks deduplicated parameter names only).
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {"model": {k: v for k, v in sd_model.items() if k not in frozen}, "optimizer": sd_optim}


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def save_resume(folder: Path, model, optimizer, meta: dict) -> None:
    """Write the sharded resume state to folder.tmp, then rename it into place; every rank must call it."""
    folder = Path(folder)
    tmp, old = _sibling(folder, ".tmp"), _sibling(folder, ".old")
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # what a killed save left
    dist.barrier()
    # Each rank's own RNG: dropout masks follow each rank's batch shapes, so the ranks' generators differ.
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, meta["rng"])
    meta = {**meta, "rng_per_rank": rngs}
    dcp.save(_state(model, optimizer), checkpoint_id=tmp)
    if dist.get_rank() == 0:
        atomic_torch_save(meta, tmp / META_FILE)
        publish(folder, tmp, old)
    dist.barrier()


def publish(folder: Path, tmp: Path, old: Path) -> None:
    """tmp becomes folder; the previous folder stays as .old until then, and resume falls back to it."""
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def find_resume(folder: Path) -> Optional[Path]:
    """The complete resume folder: folder itself, or the .old one a kill between two renames left."""
    for candidate in (Path(folder), _sibling(Path(folder), ".old")):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def read_meta(folder: Path, hint: str) -> dict:
    return safe_torch_load(folder / META_FILE, hint=hint)


def load_resume(folder: Path, model, optimizer) -> None:
    """Fill the sharded model and optimizer from a resume folder (each rank reads what it holds)."""
    state = _state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=folder)
    except CheckpointException as e:  # a BaseException holding every rank's error and traceback: keep the first
        exc = next(iter(e.failures.values()))[0]
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # frozen weights are absent; dcp.load checked the rest
