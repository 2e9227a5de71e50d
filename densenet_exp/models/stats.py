"""Batch statistics shared by the dense layers that read a channel.

In training mode a batch norm normalizes each channel by its batch mean and variance. In a dense
block every layer's first batch norm reads the block input and every earlier layer's k new maps,
so each such source channel has the same statistics at every later layer that reads it; only the
affine gamma and beta differ per layer. Computing them once per source and step removes the
per-layer statistics pass over a concatenation that grows with depth (profile: docs/performance.md,
"Where a DenseNet step goes").

Exactness: the statistics come from the training-mode batch norm's own kernel, once per source;
a layer's output is `native_batch_norm` in eval form given them (one pass, no reduction). Its
backward returns, besides the input, gamma and beta gradients of the eval form, the gradients
with respect to the mean and inverse deviation; autograd sums them over the layers reading a
source and carries them through that source's statistics (`_Statistics.backward`), which gives
the training-mode batch norm's input gradient term by term (float64: equal to 1e-13).
Running statistics are updated per layer from the same mean and unbiased variance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class BatchStats(NamedTuple):
    """A source's per-channel batch mean and 1 / sqrt(biased variance + eps), in fp32 at least (as
    a training-mode batch norm keeps them), on autograd's graph."""

    mean: Tensor
    invstd: Tensor


class _Statistics(torch.autograd.Function):
    """The batch statistics of x (N, C, H, W), from the training-mode batch norm's own kernel
    (`var_mean` over (0, 2, 3) of a channels_last map was 30x slower here)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ones = x.new_ones(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
        _, mean, invstd = torch.ops.aten.native_batch_norm(x, ones, torch.zeros_like(ones), None, None, True, 0.0, eps)
        ctx.save_for_backward(x, mean, invstd)
        return mean, invstd

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_invstd: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, invstd = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        # d mean / dx = 1/N; d invstd / dx = -invstd^3 (x - mean) / N: so the input's gradient is
        # (x - mean) * scale + grad_mean / N, one eval-form batch-norm pass (unit variance, no eps).
        scale = -grad_invstd * invstd.pow(3) / count
        grad_x = torch.ops.aten.native_batch_norm(x, scale, grad_mean / count, mean, torch.ones_like(mean), False, 0.0,
                                                  0.0)[0]
        return grad_x, None


def batch_stats(features: Tensor, eps: float) -> BatchStats:
    """The batch statistics of `features` as a training-mode batch norm with this `eps` computes them."""
    return BatchStats(*_Statistics.apply(features, eps))


class SharedStatsNormRelu(torch.autograd.Function):
    """relu(batch_norm(x)) in training mode, with the batch statistics of x given as inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:  # type: ignore[override]
        # Eval form: (x - mean) * invstd * weight + bias in one pass, without statistics (the
        # kernel takes a variance: invstd^-2 with eps 0).
        var = invstd.pow(-2)
        out = torch.ops.aten.native_batch_norm(x, weight, bias, mean, var, False, 0.0, 0.0)[0].relu_()
        ctx.save_for_backward(x, weight, mean, invstd, var, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd, var, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, mean, var, None, None, False, 0.0, [True, True, True]
        )
        # out = weight * (x - mean) * invstd + bias: the statistics' gradients from the sums the
        # eval-form backward took already (grad_bias = sum(grad), grad_weight = sum(grad * x_hat)).
        return grad_x, grad_weight, grad_bias, -weight * invstd * grad_bias, weight * grad_weight / invstd


def update_running_stats(norm: nn.BatchNorm2d, stats: BatchStats, count: int, momentum: float) -> None:
    """Move `norm`'s running statistics towards this batch's, as its training forward does: the
    mean, and the variance unbiased over `count` values per channel."""
    if norm.running_mean is None or norm.running_var is None:
        return
    with torch.no_grad():
        var = (stats.invstd.pow(-2) - norm.eps) * (count / max(count - 1, 1))
        norm.running_mean.lerp_(stats.mean.to(norm.running_mean.dtype), momentum)
        norm.running_var.lerp_(var.to(norm.running_var.dtype), momentum)
