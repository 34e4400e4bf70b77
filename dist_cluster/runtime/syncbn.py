"""Batch statistics over all ranks, on GPU and on CPU.

Why: a rank's local batch can be dominated by one rotation or super-cluster, so local batch
statistics leak the label; the trunk must normalise with the statistics of the global batch.
torch's nn.SyncBatchNorm refuses CPU tensors and reduces through the default group itself, so
wherever the group is not NCCL (gloo on CPU, or gloo with dist.device=cuda: ranks sharing one GPU)
we use `DistBatchNorm`: per-channel sum, sum of squares and count reduced with the autograd-aware
all_reduce, so gradients flow through the statistics exactly as in one process holding the batch.

    model = convert_sync_batchnorm(model, device)   # before DDP
"""
from __future__ import annotations

import torch
from torch import nn

from dist_cluster.runtime import comm


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of the batch summed over all ranks."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        world = comm.group_size()
        if not self.training or world == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        # float64 sums: E[x^2] - E[x]^2 cancels badly in float32 over large batches
        x64 = x.double()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count])
        stats = comm.all_reduce_autograd(stats)
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.to(x.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(x.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        inv_std = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype).view(shape)) * inv_std.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer synchronised over the default group (torch's SyncBN under NCCL, ours
    otherwise: its reduce goes through comm, which moves the statistics to the group's device)."""
    if device.type == "cuda" and comm.comm_device().type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistBatchNorm):
        new = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_cpu(child))
    return module
