"""DenseNet with its three design knobs exposed: growth rate, compression and bottleneck.

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks",
CVPR 2017 (arXiv:1608.06993). Memory-efficient mode follows Pleiss et al., "Memory-Efficient
Implementation of DenseNets" (arXiv:1707.06990).

In training mode a dense layer's first batch norm reads channels whose batch statistics every
earlier layer of the block has computed already: `impl="shared_stats"` computes them once per
source and step (`stats.py`); `impl="plain"`, the default, is the original per-layer batch norm.

With the default arguments the parameter names and shapes are exactly those of
``torchvision.models.densenet121``, so torchvision's ImageNet weights load unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import is_int, is_number, require, require_int
# The knob checks live with the light option lists, so the config checks run before torch loads.
from ..options import IMPLS, KNOB_CHECKS, STEMS, check_bottleneck, check_compression, check_growth_rate  # noqa: F401
from .stats import BatchStats, SharedStatsNormRelu, batch_stats, update_running_stats


def _concat(features: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(features), 1) if len(features) > 1 else features[0]


class Workspace:
    """Scratch buffers, kept across steps, that memory-efficient mode writes into: 0, each
    layer's concatenation and 1, its BN-ReLU output, in the forward and again in the backward;
    2, the gradient of that BN-ReLU output where a 1x1 convolution's backward is a matrix product.

    Allocating these afresh per layer costs twice over on a CPU: blocks over 32 MB are mapped
    and unmapped by glibc on every use, so each step faults them in again page by page; and
    kept in the heap instead, the growing concatenations leave holes between the layers'
    outputs that the heap cannot hand back, so it ends well above the live peak. Fixed buffers
    of the widest map's size avoid both (measured: README, "Memory-efficient mode").
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def reserve(self, numel: int, dtype: torch.dtype, device: torch.device, slots: Sequence[int] = (0, 1)) -> None:
        """Grow `slots` to `numel` elements at once (not layer by layer, which would leave the
        smaller ones behind as holes)."""
        for slot in slots:
            buf = self.buffers.get((slot, dtype, device))
            if buf is None or buf.numel() < numel:
                self.buffers.pop((slot, dtype, device), None)
                self.buffers[(slot, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)

    def view(self, slot: int, like: Tensor, channels: int) -> Tensor:
        """Buffer `slot` as a tensor of `like`'s batch and spatial size with `channels` maps, in
        `like`'s memory format."""
        n, _, h, w = like.shape
        self.reserve(n * channels * h * w, like.dtype, like.device, (slot,))
        flat = self.buffers[(slot, like.dtype, like.device)][: n * channels * h * w]
        if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
            return flat.view(n, h, w, channels).permute(0, 3, 1, 2)
        return flat.view(n, channels, h, w)

    def clear(self) -> None:
        self.buffers.clear()


def _concat_into(workspace: Workspace, features: Sequence[Tensor]) -> Tensor:
    """The concatenation of `features`, written into workspace buffer 0 (one feature: itself)."""
    if len(features) == 1:
        return features[0]
    out = workspace.view(0, features[0], sum(f.shape[1] for f in features))
    return torch.cat(list(features), 1, out=out)


class _EfficientNormReluConv(torch.autograd.Function):
    """conv(relu(batch_norm(cat(features)))) in training mode, keeping for backward only the
    features (which the block keeps anyway) and the batch statistics.

    The concatenation and its normalized copy grow with depth and dominate a DenseNet's memory;
    they are recomputed in backward, one layer at a time (Pleiss et al.'s shared-memory recipe),
    into the buffers of a `Workspace` shared by all layers. Unlike ``torch.utils.checkpoint``
    the convolution is not run again: its output is kept, as the next BN needs it anyway, so
    only cheap elementwise work is repeated.
    """

    @staticmethod
    def forward(ctx, workspace: Workspace, norm_weight: Tensor, norm_bias: Tensor,  # type: ignore[override]
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
                conv_weight: Tensor, padding: int, *features: Tensor) -> Tensor:
        x = _concat_into(workspace, features)
        z = workspace.view(1, x, x.shape[1])
        _, mean, invstd = torch.ops.aten.native_batch_norm.out(
            x, norm_weight, norm_bias, running_mean, running_var, True, momentum, eps,
            out=z, save_mean=x.new_empty(0, dtype=torch.float32), save_invstd=x.new_empty(0, dtype=torch.float32),
        )
        out = F.conv2d(z.relu_(), conv_weight, padding=padding)  # autocast, if on, casts here
        ctx.save_for_backward(norm_weight, norm_bias, conv_weight, mean, invstd, *features)
        ctx.workspace, ctx.eps, ctx.padding, ctx.conv_dtype = workspace, eps, padding, out.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        norm_weight, norm_bias, conv_weight, mean, invstd, *features = ctx.saved_tensors
        x = _concat_into(ctx.workspace, features)
        # The forward's normalized maps again, from its batch statistics: one fused pass.
        scale = invstd * norm_weight
        shape = (1, -1, 1, 1)
        z = ctx.workspace.view(1, x, x.shape[1])
        torch.addcmul((norm_bias - mean * scale).view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype), out=z)
        z.relu_()
        if _as_matrices(grad, z, conv_weight):
            # A 1x1 convolution in channels_last is a matrix product over (pixels, channels): its
            # input gradient goes straight into workspace buffer 2, not into a fresh block.
            g, c = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1]), z.shape[1]
            w = conv_weight.view(conv_weight.shape[0], c)
            grad_z = ctx.workspace.view(2, z, c)
            torch.mm(g, w, out=grad_z.permute(0, 2, 3, 1).view(-1, c))
            grad_conv_weight = (g.t() @ z.permute(0, 2, 3, 1).reshape(-1, c)).view_as(conv_weight) \
                if ctx.needs_input_grad[7] else None
        else:
            grad_z, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
                grad, z.to(ctx.conv_dtype), conv_weight.to(ctx.conv_dtype), None, [1, 1], [ctx.padding] * 2,
                [1, 1], False, [0, 0], 1, [True, ctx.needs_input_grad[7], False],
            )
            grad_z = grad_z.to(z.dtype)
        torch.ops.aten.threshold_backward.grad_input(grad_z, z, 0, grad_input=grad_z)  # ReLU's gradient, in place
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_batch_norm_backward(
            grad_z, x, norm_weight, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        grad_features = torch.split(grad_x, [f.shape[1] for f in features], 1)
        if grad_conv_weight is not None:
            grad_conv_weight = grad_conv_weight.to(conv_weight.dtype)
        return (None, grad_norm_weight, grad_norm_bias, None, None, None, None, grad_conv_weight, None,
                *grad_features)


def _as_matrices(grad: Tensor, z: Tensor, weight: Tensor) -> bool:
    """Whether a convolution's backward can run as two matrix products: 1x1, one dtype, and
    both maps in channels_last."""
    cl = torch.channels_last
    return (weight.shape[2:] == (1, 1) and grad.dtype == z.dtype == weight.dtype
            and z.is_contiguous(memory_format=cl) and grad.is_contiguous(memory_format=cl) and z.dim() == 4
            and z.shape[2:] != (1, 1))  # 1x1 maps are contiguous in both formats: leave them to the conv


def _running_stats_factor(norm: nn.BatchNorm2d) -> float:
    """The running-statistics momentum a training-mode ``norm`` uses for this batch, counting the
    batch as nn.BatchNorm2d.forward does."""
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
    if norm.momentum is None:  # a cumulative average
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


class DenseLayer(nn.Module):
    """One composite layer H_l: BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k) with bottleneck
    ("-B"), else BN-ReLU-Conv3x3(k). Reads the concatenation of every earlier feature map."""

    def __init__(
        self,
        in_features: int,
        growth_rate: int,
        bn_size: int,
        bottleneck: bool,
        drop_rate: float,
        memory_efficient: bool,
        workspace: Workspace | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        if bottleneck:
            self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_features, growth_rate, 3, padding=1, bias=False)
        self.bottleneck = bottleneck
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient
        # Scratch memory shared by every layer of the model (a plain attribute: no state).
        self.workspace = workspace if workspace is not None or not memory_efficient else Workspace()

    def _norm_relu_conv(self, norm: nn.BatchNorm2d, conv: nn.Conv2d, features: list[Tensor]) -> Tensor:
        if self.memory_efficient and self.training and torch.is_grad_enabled():
            # Neither the concatenation nor a BN-ReLU output is stored: the first grows with
            # depth, the second (4k maps after the bottleneck) is 4x what the layer adds.
            return _EfficientNormReluConv.apply(
                self.workspace, norm.weight, norm.bias, norm.running_mean, norm.running_var, _running_stats_factor(norm), norm.eps,
                conv.weight, conv.padding[0], *features,
            )
        return conv(F.relu(norm(_concat(features)), inplace=True))

    def _shared_norm_relu_conv(self, features: list[Tensor], stats: list[BatchStats]) -> Tensor:
        """The first BN-ReLU-conv from the sources' batch statistics, computed once per block."""
        norm = self.norm1
        shared = BatchStats(*(torch.cat(s, 0) for s in zip(*stats)))
        x = _concat(features)
        update_running_stats(norm, shared, x.numel() // x.shape[1], _running_stats_factor(norm))
        z = SharedStatsNormRelu.apply(x, norm.weight, norm.bias, shared.mean, shared.invstd)
        return self.conv1(z)

    def forward(self, features: list[Tensor], stats: list[BatchStats] | None = None) -> Tensor:
        """`stats`: each feature's batch statistics (training mode, `impl="shared_stats"`)."""
        if stats is not None:
            out = self._shared_norm_relu_conv(features, stats)
        else:
            out = self._norm_relu_conv(self.norm1, self.conv1, features)
        if self.drop_rate:
            out = F.dropout(out, self.drop_rate, self.training)
        if self.bottleneck:
            out = self._norm_relu_conv(self.norm2, self.conv2, [out])
            if self.drop_rate:
                out = F.dropout(out, self.drop_rate, self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """`num_layers` dense layers; layer l sees the block input and the outputs of layers < l."""

    def __init__(
        self,
        num_layers: int,
        in_features: int,
        growth_rate: int,
        bn_size: int,
        bottleneck: bool,
        drop_rate: float,
        memory_efficient: bool,
        workspace: Workspace | None = None,
        impl: str = "plain",
    ) -> None:
        super().__init__()
        # Memory-efficient mode recomputes the batch norm in its own backward: it keeps its path.
        self.shared_stats = impl == "shared_stats" and not memory_efficient
        self.workspace = workspace if workspace is not None or not memory_efficient else Workspace()
        # The widest map a memory-efficient layer writes into the workspace.
        self.widest = max(in_features + (num_layers - 1) * growth_rate, bn_size * growth_rate if bottleneck else 0)
        for i in range(num_layers):
            layer = DenseLayer(
                in_features + i * growth_rate, growth_rate, bn_size, bottleneck, drop_rate, memory_efficient,
                self.workspace,
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.eps = layer.norm1.eps  # every first batch norm's: the shared statistics' eps

    def forward(self, x: Tensor) -> Tensor:
        # Keep a list and concatenate once per layer inside the layer (not once per block
        # iteration here), so memory-efficient mode can recompute that concatenation.
        features = [x]
        if self.workspace is not None and self.training and torch.is_grad_enabled():
            n, _, h, w = x.shape
            self.workspace.reserve(n * self.widest * h * w, x.dtype, x.device)
        if self.shared_stats and self.training:
            stats: list[BatchStats] = []
            for layer in self.values():
                stats += [batch_stats(f, self.eps) for f in features[len(stats):]]
                features.append(layer(features, stats))
        else:
            for layer in self.values():
                features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to floor(theta * m) maps, then 2x2 average pooling with stride 2."""

    def __init__(self, in_features: int, out_features: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_features, out_features, 1, bias=False))
        if drop_rate:
            self.add_module("drop", nn.Dropout(drop_rate))
        # ceil_mode keeps odd maps (7x7 from a 28x28 input) from shrinking to zero; for the even
        # sizes of a 224x224 input it is identical to torchvision's pooling.
        self.add_module("pool", nn.AvgPool2d(2, stride=2, ceil_mode=True))


def transition_width(in_features: int, compression: float) -> int:
    """Maps a transition keeps: floor(theta * m), at least one."""
    # Rounding first keeps float error from flooring 0.29 * 100 = 28.999... to 28.
    return max(1, math.floor(round(compression * in_features, 9)))


class DenseNet(nn.Module):
    """DenseNet of Huang et al. 2017 with growth rate k, compression theta and bottleneck as knobs.

    Args:
        growth_rate: k, new feature maps per dense layer.
        block_config: dense layers per block.
        compression: theta in (0, 1]; a transition outputs floor(theta * m) maps ("-C" when < 1).
        bottleneck: put a 1x1 conv to bn_size*k maps before each 3x3 conv ("-B").
        bn_size: bottleneck width multiplier.
        num_init_features: maps of the first convolution.
        drop_rate: dropout after each convolution but the first (the paper's no-augmentation setting).
        num_classes: classifier outputs.
        in_channels: input image channels (1 for grayscale).
        stem: "imagenet" (7x7/2 conv, BN-ReLU, 3x3/2 max-pool) or "cifar" (3x3/1 conv).
        memory_efficient: keep neither the concatenation nor its BN-ReLU for backward; recompute them.
        impl: the training step's implementation, one of IMPLS; "shared_stats" computes each dense
            layer's first batch norm from batch statistics shared per source channel (stats.py),
            in normal mode (memory-efficient mode keeps its own). Same parameters and buffers.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        compression: float = 0.5,
        bottleneck: bool = True,
        bn_size: int = 4,
        num_init_features: int = 64,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        memory_efficient: bool = False,
        impl: str = "plain",
    ) -> None:
        super().__init__()
        check_growth_rate(growth_rate)
        require(
            "block_config",
            block_config,
            isinstance(block_config, Sequence)
            and len(block_config) > 0
            and all(is_int(n) and n >= 1 for n in block_config),
            "a non-empty sequence of integers >= 1",
        )
        check_compression(compression)
        check_bottleneck(bottleneck)
        require_int("bn_size", bn_size, 1)
        require_int("num_init_features", num_init_features, 1)
        require("drop_rate", drop_rate, is_number(drop_rate) and 0 <= drop_rate < 1, "a number in [0, 1)")
        require_int("num_classes", num_classes, 1)
        require_int("in_channels", in_channels, 1)
        require("stem", stem, stem in STEMS, f"one of {', '.join(STEMS)}")
        require("impl", impl, impl in IMPLS, f"one of {', '.join(IMPLS)}")

        self.growth_rate = growth_rate
        self.compression = float(compression)
        self.bottleneck = bottleneck
        self.block_config = tuple(block_config)

        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
            ]
        else:
            # Pre-activation: the first dense layer's BN-ReLU follows this conv directly.
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False))]
        self.features = nn.Sequential(OrderedDict(layers))

        self.workspace = Workspace() if memory_efficient else None
        width = num_init_features
        for i, num_layers in enumerate(self.block_config):
            block = DenseBlock(
                num_layers, width, growth_rate, bn_size, bottleneck, drop_rate, memory_efficient, self.workspace, impl
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            width += num_layers * growth_rate
            if i != len(self.block_config) - 1:
                out = transition_width(width, compression)
                self.features.add_module(f"transition{i + 1}", Transition(width, out, drop_rate))
                width = out
        self.features.add_module(f"norm{len(self.block_config) + 1}", nn.BatchNorm2d(width))
        self.classifier = nn.Linear(width, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # He initialization, as in the paper
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # `.to(device)`, `.half()` and the like: drop scratch memory of the old device or dtype.
        if self.workspace is not None:
            self.workspace.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def with_implementation(model: nn.Module, memory_efficient: bool) -> nn.Module | None:
    """A copy of `model` whose dense layers all use one implementation: plain concatenation
    (`memory_efficient=False`, per-layer batch norm) or Pleiss et al.'s recomputation. Same
    weights and buffers; `model` itself is untouched. None when `model` has no dense layers.
    The probes measure both implementations' memory on one trained configuration with it."""
    import copy

    if not any(isinstance(m, DenseLayer) for m in model.modules()):
        return None
    twin = copy.deepcopy(model)
    workspace = Workspace() if memory_efficient else None
    for m in twin.modules():
        if isinstance(m, DenseLayer):
            m.memory_efficient = memory_efficient
        if isinstance(m, DenseBlock):
            m.shared_stats = False
        if isinstance(m, (DenseLayer, DenseBlock, DenseNet)):
            m.workspace = workspace
    return twin


def _preset(growth_rate: int, block_config: tuple[int, ...], num_init_features: int, overrides: dict) -> DenseNet:
    kwargs = {"growth_rate": growth_rate, "block_config": block_config, "num_init_features": num_init_features}
    kwargs.update(overrides)
    return DenseNet(**kwargs)


def densenet121(**overrides) -> DenseNet:
    """DenseNet-121 (paper Table 1): k=32, blocks 6-12-24-16."""
    return _preset(32, (6, 12, 24, 16), 64, overrides)


def densenet161(**overrides) -> DenseNet:
    """DenseNet-161 (paper Table 1): k=48, blocks 6-12-36-24, 96 initial maps."""
    return _preset(48, (6, 12, 36, 24), 96, overrides)


def densenet169(**overrides) -> DenseNet:
    """DenseNet-169 (paper Table 1): k=32, blocks 6-12-32-32."""
    return _preset(32, (6, 12, 32, 32), 64, overrides)


def densenet201(**overrides) -> DenseNet:
    """DenseNet-201 (paper Table 1): k=32, blocks 6-12-48-32."""
    return _preset(32, (6, 12, 48, 32), 64, overrides)


def densenet264(**overrides) -> DenseNet:
    """DenseNet-264 (paper Table 1): k=32, blocks 6-12-64-48."""
    return _preset(32, (6, 12, 64, 48), 64, overrides)


def densenet_cifar(
    depth: int = 100,
    growth_rate: int = 12,
    bottleneck: bool = True,
    compression: float = 0.5,
    num_classes: int = 10,
    **overrides,
) -> DenseNet:
    """The paper's CIFAR/SVHN family: three dense blocks of (depth-4)/3 layers, half that with
    bottleneck; first conv of 16 maps, or 2k for DenseNet-BC; 3x3 stem. DenseNet-BC (L=100, k=12)
    is ``densenet_cifar(100, 12, True, 0.5)``."""
    require("depth", depth, is_int(depth) and depth >= 7 and (depth - 4) % 3 == 0, "4 + 3n for n >= 1")
    per_block = (depth - 4) // 3
    if bottleneck:
        require("depth", depth, per_block % 2 == 0, "4 + 6n with bottleneck (two convs per layer)")
        per_block //= 2
    kwargs = {
        "growth_rate": growth_rate,
        "block_config": (per_block,) * 3,
        "compression": compression,
        "bottleneck": bottleneck,
        "num_init_features": 2 * growth_rate if bottleneck and compression < 1 else 16,
        "num_classes": num_classes,
        "stem": "cifar",
    }
    kwargs.update(overrides)
    return DenseNet(**kwargs)
