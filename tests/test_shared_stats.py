"""`impl="shared_stats"` (models/stats.py) trains as the plain DenseNet does: the same losses,
gradients, running statistics and batch counts over several SGD steps, for every variant
(bottleneck on/off, compression < 1, memory-efficient on/off, dropout), to float64 round-off
exactly and within stated fp32 and bf16 tolerances; torchvision's weights still load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from densenet_exp.models import DenseNet, build_model, densenet121

STEPS = 3
VARIANTS = {  # name: DenseNet arguments beyond the tiny net's
    "BC": {"bottleneck": True, "compression": 0.5},
    "B": {"bottleneck": True, "compression": 1.0},
    "C": {"bottleneck": False, "compression": 0.5},
    "plain-knobs": {"bottleneck": False, "compression": 1.0},
    "BC-dropout": {"bottleneck": True, "compression": 0.5, "drop_rate": 0.2},
}
# Memory-efficient mode keeps its own recomputing path (fp32 and bf16 only: its saved statistics
# are fp32), so it is compared in fp32.
FP32_VARIANTS = {"BC": VARIANTS["BC"], "C": VARIANTS["C"],
                 "BC-memory-efficient": {**VARIANTS["BC"], "memory_efficient": True},
                 "C-memory-efficient": {**VARIANTS["C"], "memory_efficient": True}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def twins(dtype: torch.dtype = torch.float32, channels_last: bool = False, **kwargs) -> tuple[DenseNet, DenseNet]:
    """The plain and the shared-statistics net, the same weights."""
    models = []
    for impl in ("plain", "shared_stats"):
        torch.manual_seed(0)
        model = DenseNet(growth_rate=6, block_config=(3, 4), num_init_features=12, bn_size=2, num_classes=10,
                         in_channels=1, stem="cifar", impl=impl, **kwargs).to(dtype)
        models.append(model.to(memory_format=torch.channels_last) if channels_last else model)
    return models[0], models[1]


def train(model: DenseNet, dtype: torch.dtype, channels_last: bool = False, bf16: bool = False):
    """Losses, gradients (of each step) and the final state of STEPS SGD steps on fixed batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], []
    model.train()
    for step in range(STEPS):
        x = torch.randn(16, 1, 12, 12, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (16,), generator=g)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        torch.manual_seed(10 + step)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().double() for p in model.parameters()]))
        optimizer.step()
    return torch.tensor(losses), grads, model.state_dict()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_shared_statistics_train_as_the_plain_step_to_float64_round_off(variant):
    # The same mathematics: any slip in a gradient formula shows far above 1e-10.
    plain, shared = twins(torch.float64, **variant)
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = train(plain, torch.float64), train(shared, torch.float64)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    for step, (a, b) in enumerate(zip(grads_a, grads_b)):
        assert relative(b, a) < 1e-10, step
    assert state_a.keys() == state_b.keys()
    for name in state_a:  # running statistics, batch counts and weights after the steps
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("variant", FP32_VARIANTS.values(), ids=FP32_VARIANTS.keys())
def test_shared_statistics_in_fp32_within_fp32_tolerance(variant, channels_last):
    # Summing rounded terms in another order: 1e-7 per op, a few 1e-6 after three steps.
    plain, shared = twins(channels_last=channels_last, **variant)
    (loss_a, grads_a, state_a) = train(plain, torch.float32, channels_last)
    (loss_b, grads_b, state_b) = train(shared, torch.float32, channels_last)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for step, (a, b) in enumerate(zip(grads_a, grads_b)):
        assert relative(b, a) < 1e-4, step
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_shared_statistics_under_bf16_autocast_within_bf16_tolerance():
    # bf16 keeps 8 bits of mantissa, so the tolerance is bf16's own effect: the shared statistics
    # move each step's gradient less than bf16 moves the plain step's from fp32's.
    plain, shared = twins(channels_last=True, **VARIANTS["BC"])
    reference, _ = twins(channels_last=True, **VARIANTS["BC"])
    (loss_a, grads_a, state_a) = train(plain, torch.float32, True, bf16=True)
    (loss_b, grads_b, state_b) = train(shared, torch.float32, True, bf16=True)
    (_, grads_fp32, _) = train(reference, torch.float32, True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=1e-3)
    for step, (a, b, exact) in enumerate(zip(grads_a, grads_b, grads_fp32)):
        assert F.cosine_similarity(a, b, dim=0) > 0.99 and relative(b, a) < relative(a, exact), step
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=2e-2, atol=2e-3, msg=name)


def test_the_plain_step_stays_the_default_and_torchvision_weights_load():
    assert DenseNet().features.denseblock1.shared_stats is False
    tv = torchvision.models.densenet121(weights=None)
    ours = densenet121(impl="shared_stats")
    assert ours.features.denseblock1.shared_stats is True
    assert list(ours.state_dict()) == list(tv.state_dict())  # the same keys, in the same order
    ours.load_state_dict(tv.state_dict(), strict=True)


def test_an_unknown_implementation_is_refused_with_its_config_key():
    with pytest.raises(ValueError, match=r"model\.impl='fused' is invalid: expected one of plain, shared_stats"):
        build_model({"arch": "densenet_cifar", "depth": 28, "impl": "fused"})


@pytest.mark.slow
def test_compiled_shared_statistics_train_as_the_eager_plain_step():
    # One graph (dynamo traces both autograd functions), within the fp32 tolerance above.
    plain, shared = twins(channels_last=True, **VARIANTS["BC"])
    compiled = torch.compile(shared)
    (loss_a, grads_a, _) = train(plain, torch.float32, True)
    (loss_b, grads_b, _) = train(compiled, torch.float32, True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for step, (a, b) in enumerate(zip(grads_a, grads_b)):
        assert relative(b, a) < 1e-4, step
