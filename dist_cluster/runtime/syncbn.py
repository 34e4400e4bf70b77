"""Batch statistics over all ranks, on GPU and on CPU.

Why: a rank's local batch can be dominated by one rotation or super-cluster, so local batch
statistics leak the label; the trunk must normalise with the statistics of the global batch.
torch's nn.SyncBatchNorm refuses CPU tensors and reduces through the default group itself, so
wherever the group is not NCCL (gloo on CPU, or gloo with dist.device=cuda: ranks sharing one GPU)
we use `DistBatchNorm`: the statistics of the global batch and their exact backward, on ATen's fused
CPU batch-norm kernels (a step of the Quickstart's model: 1.31x faster than the float64 autograd
version it replaced, bench/train.py model-only at 2 ranks, 2026-12-04).

    model = convert_sync_batchnorm(model, device)   # before DDP
"""
from __future__ import annotations

import torch
from torch import nn

from dist_cluster.runtime import comm


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the mean and variance of the batch over
    all ranks, and the exact backward of that (what torch's SyncBatchNorm computes on CUDA).

    Built on ATen's fused CPU kernels, which torch's CUDA-only helpers (batch_norm_stats, ...) lack:
    forward: native_batch_norm gives this rank's mean and 1/std; (count, count * mean,
    count * (var + mean^2)) are combined across ranks in float64 (one all_reduce), then the output is
    batch_norm's inference kernel with the global statistics. Backward: native_batch_norm_backward in
    inference mode gives dy * w / std and this rank's sum(dy) and sum(dy * xhat); one all_reduce makes
    them global, and the statistics' share of the gradient, -w / std * (sum(dy) + xhat * sum(dy * xhat))
    / n, is one affine pass in x. The weight and bias get this rank's sums; DDP reduces them."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        channels = x.shape[1]
        _, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        mean64 = mean.double()
        var64 = (invstd.double().pow(-2) - eps).clamp_min(0)
        count = x.numel() / channels
        stats = torch.cat([mean64 * count, (var64 + mean64 * mean64) * count,
                           torch.full((1,), count, dtype=torch.float64)])
        comm.all_reduce(stats)
        n = stats[-1]
        g_mean64 = stats[:channels] / n
        g_var = (stats[channels:2 * channels] / n - g_mean64 * g_mean64).clamp_min(0).to(x.dtype)
        g_mean = g_mean64.to(x.dtype)
        y = torch.nn.functional.batch_norm(x, g_mean, g_var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, g_mean, g_var)
        ctx.eps, ctx.count = eps, float(n)
        return y, g_mean, g_var, n

    @staticmethod
    def backward(ctx, dy, _mean_grad, _var_grad, _n_grad):
        x, weight, mean, var = ctx.saved_tensors
        channels, dy = x.shape[1], dy.contiguous(memory_format=_layout(x))
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        grad_weight = sum_dy_xhat.clone() if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.clone() if ctx.needs_input_grad[2] else None
        sums = torch.cat([sum_dy, sum_dy_xhat])
        comm.all_reduce(sums)
        invstd = torch.rsqrt(var + ctx.eps)
        scale = invstd if weight is None else invstd * weight
        slope = scale * invstd * sums[channels:] / ctx.count  # per channel: the xhat term, in x
        offset = scale * sums[:channels] / ctx.count - slope * mean
        shape = [1, channels] + [1] * (x.dim() - 2)
        dx = dx - torch.addcmul(offset.view(shape), x, slope.view(shape))
        return dx, grad_weight, grad_bias, None


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of the batch summed over all ranks."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or comm.group_size() == 1:
            return super().forward(x)
        y, mean, var, n = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1)).to(var.dtype)
                self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
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
