"""What one save holds, and which rank writes each part: one copy of every tensor per save.

    shared file (rank 0)   trunk + super head (the module's state_dict), the trunk optimiser's state,
                           the super head's momentum, progress, config
    rank file of rank r    r's random streams; and each sub head whose group r leads (its first
                           owner, distributed.ownership): the head's weights and momentum

Why: every owner of a head holds the same values (its gradient is all_reduced inside the group,
heads.py), so one copy is enough. At the paper's settings (64 ranks, 16 heads of Linear(4096, 80000),
groups of 4) the heads' weights and momentum are 16 x 2.6 GB: written by the 16 leaders a save is
~43 GB with the trunk, where every rank writing its own copy made it ~168 GB. On resume every owner
reads its heads from their leader's file, so all owners start from the very same values.

Optimiser state is keyed by parameter name, not by the optimiser's position index: the head
optimiser holds the super head and the sub heads a rank owns, a different list on every rank, so a
head's momentum written by one rank must be found by name on another.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from dist_cluster.checkpoint import store
from dist_cluster.runtime import distributed

FORMAT = 2  # a shared file without "format": every rank saved its heads and head optimiser itself


def param_state(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict:
    """{parameter name: the optimiser's state for it (SGD: momentum_buffer)}, for module's
    parameters that have one (none before the first step). The live tensors: callers copy."""
    return {name: dict(optimizer.state[p]) for name, p in module.named_parameters() if optimizer.state.get(p)}


def load_param_state(optimizer: torch.optim.Optimizer, module: torch.nn.Module, saved: dict) -> None:
    """Set module's parameters' optimiser state to `saved` (param_state's output); a parameter
    absent from it gets none, as before its first step."""
    for name, p in module.named_parameters():
        optimizer.state.pop(p, None)
        if name in saved:
            optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in saved[name].items()}


def shared_record(module, trunk_opt, head_opt, progress: dict, config: str) -> dict:
    """Rank 0's part: the replicated state (live tensors; the writer copies them)."""
    return {"model": module.state_dict(), "trunk_opt": trunk_opt.state_dict(),
            "super_head_optim": param_state(head_opt, module.super_head) if head_opt is not None else {},
            "progress": dict(progress), "config": config, "format": FORMAT}


def rank_record(heads, head_opt, device: torch.device) -> dict:
    """This rank's part: its random streams, and the sub heads it leads with their momentum."""
    owned = heads.state_dict_owned(head_opt) if heads is not None else {}
    return {"heads": owned, **store.rng_state(device)}


def restore_heads(module, heads, head_opt, shared: dict, per_rank: dict,
                  read_rank_file: Callable[[int], dict]) -> None:
    """Put the saved super head, sub heads and their momentum back on this rank. Each owned sub
    head comes from its group leader's rank file (`read_rank_file(rank)`, read once per leader)."""
    module.super_head.load_state_dict(
        {k.removeprefix("super_head."): v for k, v in shared["model"].items() if k.startswith("super_head.")})
    if "format" not in shared:  # the layout before: this rank's own copy, optimiser by position
        if heads is not None:
            heads.load_state_dict(per_rank["heads"])
        head_opt.load_state_dict(per_rank["head_opt"])
        return
    load_param_state(head_opt, module.super_head, shared["super_head_optim"])
    if heads is None:
        return
    me, saved = distributed.rank(), {}
    for leader in sorted({heads.owners[s][0] for s in heads.owned}):
        saved.update((per_rank if leader == me else read_rank_file(leader))["heads"])
    heads.load_state_dict_owned(saved, head_opt)


def restore_from(loaded, run_dir, device, module, heads, head_opt) -> None:
    """restore_heads from a store.Loaded of a step (a round copy has no heads to restore)."""
    read = partial(store.load_rank_file, run_dir, global_step=loaded.step, map_location=device)
    restore_heads(module, heads, head_opt, loaded.shared, loaded.per_rank, read)
