"""Tests of the model zoo: DenseNet knobs, torchvision compatibility, the paper's parameter counts,
memory-efficient mode, and the ResNet / plain baselines."""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
import torchvision
from torch import nn

from densenet_exp.models import (
    DenseLayer,
    DenseNet,
    Transition,
    build_model,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_cifar,
    plain_cifar,
    resnet_cifar,
)

DEFAULT_BLOCKS = (6, 12, 24, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module's convolutions on one intra-op thread. On the 2-core box, with another job
    running, two spinning OpenMP threads made the file 3-7x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so an eval-mode
    comparison also checks that each BN's buffers landed in the right place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def transitions(model: DenseNet) -> list[Transition]:
    return [m for m in model.features if isinstance(m, Transition)]


# --------------------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (densenet121, torchvision.models.densenet121),
        (densenet161, torchvision.models.densenet161),
        (densenet169, torchvision.models.densenet169),
        (densenet201, torchvision.models.densenet201),
    ],
    ids=["121", "161", "169", "201"],
)
def test_presets_match_torchvision(ours, theirs):
    torch.manual_seed(0)
    tv = theirs(weights=None)
    randomize_norms(tv)
    model = ours()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    model.load_state_dict(tv.state_dict(), strict=True)
    model.eval()
    tv.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref, out = tv(x), model(x)
    assert out.shape == (1, 1000)
    assert ref.abs().max() > 1e-3  # the comparison is not between two vectors of zeros
    assert (out - ref).abs().max().item() <= 1e-5


def test_densenet121_default_is_densenet121():
    assert n_params(DenseNet()) == 7_978_856
    assert n_params(densenet121()) == 7_978_856
    assert DenseNet().state_dict().keys() == densenet121().state_dict().keys()


# --------------------------------------------------------------------------- paper's parameter counts


@pytest.mark.parametrize(
    ("depth", "k", "bottleneck", "compression", "millions"),
    [
        (40, 12, False, 1.0, 1.0),  # DenseNet (k=12, L=40)
        (100, 12, False, 1.0, 7.0),  # DenseNet (k=12, L=100)
        (100, 24, False, 1.0, 27.2),  # DenseNet (k=24, L=100)
        (100, 12, True, 0.5, 0.8),  # DenseNet-BC (k=12, L=100)
        (250, 24, True, 0.5, 15.3),  # DenseNet-BC (k=24, L=250)
        (190, 40, True, 0.5, 25.6),  # DenseNet-BC (k=40, L=190)
    ],
)
def test_densenet_cifar_matches_table2(depth, k, bottleneck, compression, millions):
    model = densenet_cifar(depth, k, bottleneck, compression)
    assert round(n_params(model) / 1e6, 1) == millions
    per_block = (depth - 4) // 3 // (2 if bottleneck else 1)
    assert model.block_config == (per_block,) * 3


@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.73)])
def test_cifar_resnet_and_plain_parameter_counts(depth, millions):
    # He et al. 2016, Table 6 (ResNet-110 printed as 1.7M).
    resnet, plain = resnet_cifar(depth), plain_cifar(depth)
    assert round(n_params(resnet) / 1e6, 2) == millions
    # Option-A shortcuts are parameter-free, so the plain net has exactly the same parameters.
    assert n_params(plain) == n_params(resnet)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in resnet.state_dict().items()}


def test_resnet110_is_1_7m():
    assert round(n_params(resnet_cifar(110)) / 1e6, 1) == 1.7


def test_plain_net_has_no_identity_path():
    """Zero every conv of the last stage: a ResNet still carries the input to the classifier through
    its shortcuts, a plain net outputs the classifier bias whatever the input."""
    torch.manual_seed(0)
    resnet, plain = resnet_cifar(110), plain_cifar(110)
    plain.load_state_dict(resnet.state_dict())
    x = torch.randn(2, 3, 32, 32)
    resnet.eval()
    plain.eval()
    with torch.no_grad():
        before = plain(x)
        assert not torch.allclose(before[0], before[1])  # the plain net does see its input at first
        for model in (resnet, plain):
            for m in model.layer3.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.zero_()
        out_res, out_plain = resnet(x), plain(x)
    assert (out_res[0] - out_res[1]).abs().max() > 1e-3
    assert torch.equal(out_plain[0], out_plain[1])
    assert torch.allclose(out_plain, plain.fc.bias.expand_as(out_plain))


# --------------------------------------------------------------------------- memory-efficient mode


def _twin_models(bottleneck: bool, drop_rate: float) -> tuple[DenseNet, DenseNet]:
    kwargs = dict(
        growth_rate=12, block_config=(3, 4, 5), bottleneck=bottleneck, drop_rate=drop_rate, num_classes=10, stem="cifar"
    )
    torch.manual_seed(0)
    normal = DenseNet(**kwargs)
    efficient = DenseNet(memory_efficient=True, **kwargs)
    randomize_norms(normal)
    efficient.load_state_dict(normal.state_dict(), strict=True)
    return normal.train(), efficient.train()


def _recomputing_nodes(out: torch.Tensor) -> int:
    """Nodes of `out`'s autograd graph that recompute a BN-ReLU in backward."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [next_node for next_node, _ in node.next_functions]
    return sum(type(node).__name__ == "_EfficientNormReluConvBackward" for node in seen)


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
@pytest.mark.parametrize("bottleneck", [True, False], ids=["B", "noB"])
def test_memory_efficient_same_outputs_and_gradients(bottleneck, drop_rate):
    normal, efficient = _twin_models(bottleneck, drop_rate)
    x = torch.randn(2, 3, 32, 32)
    target = torch.randn(2, 10)
    results = []
    for model in (normal, efficient):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # same dropout masks
        out = model(xi)
        recomputing = _recomputing_nodes(out)
        (out * target).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.detach(), xi.grad, grads, recomputing, copy.deepcopy(model.state_dict())))
    (out_n, gx_n, g_n, rec_n, sd_n), (out_e, gx_e, g_e, rec_e, sd_e) = results
    # The efficient model really recomputes: every BN-ReLU-conv of every layer, none in the normal one.
    n_layers = sum(normal.block_config)
    assert rec_n == 0 and rec_e == n_layers * (2 if bottleneck else 1)
    torch.testing.assert_close(out_e, out_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_e, gx_n, rtol=1e-5, atol=1e-6)
    assert g_n.keys() == g_e.keys()
    for name in g_n:
        torch.testing.assert_close(g_e[name], g_n[name], rtol=1e-4, atol=1e-6, msg=name)
    # Running statistics and batch counts are updated once per step, as in the normal model.
    for name in sd_n:
        torch.testing.assert_close(sd_e[name], sd_n[name], rtol=1e-5, atol=1e-7, msg=name)


def _saved_bytes(model: DenseNet, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward (parameters
    excluded). For a checkpointed layer the inputs it holds for the recomputation count too."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    def keep_layer_inputs(module, args):
        if module.memory_efficient:
            for f in args[0]:
                keep(f)

    hooks = [m.register_forward_pre_hook(keep_layer_inputs) for m in model.modules() if isinstance(m, DenseLayer)]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model(x)
    for h in hooks:
        h.remove()
    assert out.requires_grad
    return sum(kept.values())


@pytest.mark.parametrize("bottleneck", [True, False], ids=["B", "noB"])
def test_memory_efficient_saves_fewer_bytes_for_backward(bottleneck):
    torch.manual_seed(0)
    normal = DenseNet(growth_rate=12, bottleneck=bottleneck, num_classes=10).train()
    efficient = DenseNet(growth_rate=12, bottleneck=bottleneck, num_classes=10, memory_efficient=True).train()
    x = torch.randn(2, 3, 64, 64)
    saved_normal, saved_efficient = _saved_bytes(normal, x), _saved_bytes(efficient, x)
    assert saved_efficient < 0.7 * saved_normal, (saved_efficient, saved_normal)


# --------------------------------------------------------------------------- forward / backward grid

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 224, 224)]
GRID = list(itertools.product(SHAPES, ["imagenet", "cifar"], [True, False], [0.5, 1.0], [12, 32]))


def _grid_id(case) -> str:
    (c, h, w), stem, bottleneck, compression, k = case
    return f"{c}x{h}x{w}-{stem}-{'B' if bottleneck else 'noB'}-theta{compression}-k{k}"


def _block_config(shape, stem, bottleneck, k):
    # The "cifar" stem keeps 224x224 at full resolution through the first block (16x the work of
    # the "imagenet" stem, 5-15 s of CPU a case), so those cases use a shallower net. Every other
    # case, including the exact densenet121 (imagenet stem, B, theta 0.5, k=32) at 224x224, uses
    # the default 6-12-24-16.
    if shape[1] == 224 and stem == "cifar":
        return (2, 2, 2, 2)
    return DEFAULT_BLOCKS


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_forward_backward_grid(case):
    shape, stem, bottleneck, compression, k = case
    torch.manual_seed(0)
    model = DenseNet(
        growth_rate=k,
        block_config=_block_config(shape, stem, bottleneck, k),
        compression=compression,
        bottleneck=bottleneck,
        num_classes=10,
        in_channels=shape[0],
        stem=stem,
    ).train()
    # Batch 2 where the last block sees 1x1 maps (train-mode BN needs two values per channel).
    batch = 1 if shape[1] == 224 else 2
    x = torch.randn(batch, *shape)
    out = model(x)
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# --------------------------------------------------------------------------- validation


def _msg(text: str) -> str:
    return re.escape(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"growth_rate": 0}, "growth_rate=0 is invalid: expected an integer >= 1"),
        ({"growth_rate": -4}, "growth_rate=-4 is invalid: expected an integer >= 1"),
        ({"compression": 0}, "compression=0 is invalid: expected a number in (0, 1]"),
        ({"compression": 1.5}, "compression=1.5 is invalid: expected a number in (0, 1]"),
        ({"block_config": ()}, "block_config=() is invalid: expected a non-empty sequence of integers >= 1"),
        ({"block_config": (6, 0, 24)}, "block_config=(6, 0, 24) is invalid: expected a non-empty sequence"),
        ({"block_config": (6, -2)}, "block_config=(6, -2) is invalid: expected a non-empty sequence of integers >= 1"),
        ({"drop_rate": -0.1}, "drop_rate=-0.1 is invalid: expected a number in [0, 1)"),
        ({"drop_rate": 1.0}, "drop_rate=1.0 is invalid: expected a number in [0, 1)"),
        ({"stem": "tiny"}, "stem='tiny' is invalid: expected one of imagenet, cifar"),
    ],
)
def test_invalid_knobs_raise(kwargs, message):
    with pytest.raises(ValueError, match=_msg(message)):
        DenseNet(**kwargs)
    # build_model names the config key.
    with pytest.raises(ValueError, match=_msg("model." + message)):
        build_model({"arch": "densenet", **kwargs})


def test_build_model_unknown_arch():
    expected = r"model\.arch='vgg16' is invalid: expected one of densenet, densenet121, .*resnet_cifar"
    with pytest.raises(ValueError, match=expected):
        build_model({"arch": "vgg16"})
    with pytest.raises(ValueError, match=r"model\.arch=None is invalid"):
        build_model({"growth_rate": 12})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 41}, "depth=41 is invalid: expected 4 + 3n for n >= 1"),
        ({"depth": 4}, "depth=4 is invalid: expected 4 + 3n for n >= 1"),
        ({"depth": 43, "bottleneck": True}, "depth=43 is invalid: expected 4 + 6n with bottleneck"),
    ],
)
def test_densenet_cifar_bad_depth(kwargs, message):
    with pytest.raises(ValueError, match=_msg(message)):
        densenet_cifar(**kwargs)
    with pytest.raises(ValueError, match=_msg("model." + message)):
        build_model({"arch": "densenet_cifar", **kwargs})


def test_densenet_cifar_depth_43_without_bottleneck_is_valid():
    assert densenet_cifar(43, bottleneck=False, compression=1.0).block_config == (13, 13, 13)


# --------------------------------------------------------------------------- knobs


def test_build_model_transition_widths_by_hand():
    model = build_model(
        {
            "arch": "densenet121",
            "growth_rate": 12,
            "compression": 1.0,
            "bottleneck": False,
            "num_classes": 10,
            "in_channels": 1,
            "stem": "cifar",
        }
    )
    assert isinstance(model, DenseNet)
    # 64 initial maps (densenet121's), k=12, theta=1: m grows by 12 per layer, floor(1.0 * m) = m.
    # block1: 64 + 6*12 = 136; block2: 136 + 12*12 = 280; block3: 280 + 24*12 = 568; block4: 568 + 16*12 = 760.
    widths = [(t.conv.in_channels, t.conv.out_channels) for t in transitions(model)]
    assert widths == [(136, 136), (280, 280), (568, 568)]
    assert model.classifier.in_features == 760 and model.classifier.out_features == 10
    conv0 = model.features.conv0
    assert (conv0.in_channels, conv0.kernel_size, conv0.stride) == (1, (3, 3), (1, 1))
    assert not hasattr(model.features, "pool0")
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_transition_width_is_floor_of_theta_m():
    # densenet121: 64 + 6*32 = 256 -> 128; 128 + 12*32 = 512 -> 256; 256 + 24*32 = 1024 -> 512; 512 + 16*32 = 1024.
    assert [t.conv.out_channels for t in transitions(densenet121())] == [128, 256, 512]
    # Odd widths: floor, not round. 10 + 3*7 = 31 -> floor(15.5) = 15; 15 + 3*7 = 36 -> 18; 18 + 21 = 39.
    model = DenseNet(growth_rate=7, block_config=(3, 3, 3), num_init_features=10, compression=0.5)
    assert [(t.conv.in_channels, t.conv.out_channels) for t in transitions(model)] == [(31, 15), (36, 18)]
    assert model.classifier.in_features == 39
    # theta = 0.3: 31 -> floor(9.3) = 9; 9 + 21 = 30 -> 9; 9 + 21 = 30.
    model = DenseNet(growth_rate=7, block_config=(3, 3, 3), num_init_features=10, compression=0.3)
    assert [t.conv.out_channels for t in transitions(model)] == [math.floor(0.3 * 31), math.floor(0.3 * 30)] == [9, 9]


def test_bottleneck_switch_changes_layer_structure():
    plain_layers = [m for m in DenseNet(growth_rate=12, bottleneck=False).modules() if isinstance(m, DenseLayer)]
    assert len(plain_layers) == sum(DEFAULT_BLOCKS)
    for layer in plain_layers:
        assert not hasattr(layer, "norm2") and not hasattr(layer, "conv2")
        assert layer.conv1.kernel_size == (3, 3) and layer.conv1.out_channels == 12
    for layer in (m for m in DenseNet(growth_rate=12, bottleneck=True).modules() if isinstance(m, DenseLayer)):
        assert hasattr(layer, "norm2") and hasattr(layer, "conv2")
        assert layer.conv1.kernel_size == (1, 1) and layer.conv1.out_channels == 4 * 12
        assert layer.conv2.kernel_size == (3, 3) and layer.conv2.out_channels == 12


@pytest.mark.parametrize("bottleneck", [True, False], ids=["B", "noB"])
def test_dropout_only_in_train_mode(bottleneck):
    kwargs = dict(growth_rate=12, block_config=(3, 3, 3), bottleneck=bottleneck, num_classes=10, stem="cifar")
    torch.manual_seed(0)
    base = DenseNet(**kwargs)
    dropped = DenseNet(drop_rate=0.2, **kwargs)
    dropped.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x), base.eval()(x))
        torch.manual_seed(1)
        out_base = base.train()(x)
        torch.manual_seed(1)
        out_dropped = dropped.train()(x)
    assert not torch.allclose(out_dropped, out_base)


def test_presets_accept_overrides():
    model = densenet169(growth_rate=12)
    assert model.growth_rate == 12
    assert model.block_config == (6, 12, 32, 32)
    assert model.features.denseblock1.denselayer1.conv2.out_channels == 12
    assert model.features.denseblock1.denselayer1.conv1.out_channels == 48
    model = build_model({"arch": "densenet161", "compression": 1.0, "bottleneck": False, "num_classes": 7})
    assert model.growth_rate == 48 and model.compression == 1.0 and not model.bottleneck
    assert model.block_config == (6, 12, 36, 24) and model.features.conv0.out_channels == 96
    assert model.classifier.out_features == 7


# --------------------------------------------------------------------------- ResNet baselines


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_resnets_cifar_stem_grayscale(arch):
    torch.manual_seed(0)
    model = build_model({"arch": arch, "stem": "cifar", "in_channels": 1, "num_classes": 10}).train()
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_resnet_cifar_depths(depth):
    torch.manual_seed(0)
    model = resnet_cifar(depth).eval()
    n = (depth - 2) // 6
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [n, n, n]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n+1 convs and the classifier
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_cifar_bad_depth():
    with pytest.raises(ValueError, match=_msg("depth=21 is invalid: expected 6n + 2 for n >= 1")):
        resnet_cifar(21)
    with pytest.raises(ValueError, match=_msg("model.depth=21 is invalid")):
        build_model({"arch": "plain_cifar", "depth": 21})
