"""Every fast path gives the plain path's results within numerical tolerance: channels_last,
bf16 autocast, memory-efficient mode inside the classifier, and torch.compile (slow)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from densenet_exp.classifier import ImageClassifier
from densenet_exp.models import DenseNet
from densenet_exp.speed import keep_freed_memory, use_channels_last

OPTIM = {"name": "sgd", "lr": 0.1}


def tiny_densenet(**kwargs) -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(growth_rate=6, block_config=(2, 3), num_init_features=12, bn_size=2, stem="cifar",
                    in_channels=1, num_classes=10, **kwargs)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


def loss_and_grads(module: ImageClassifier, batch, autocast: bool = False):
    x, y = batch
    module.train()
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = module(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    return logits.float().detach(), {n: p.grad.clone() for n, p in module.model.named_parameters()}


def test_channels_last_matches_the_plain_path(batch):
    plain = ImageClassifier(tiny_densenet(), 10, OPTIM)
    fast = ImageClassifier(copy.deepcopy(plain.model), 10, OPTIM, channels_last=True)
    assert next(p for p in fast.model.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    logits_a, grads_a = loss_and_grads(plain, batch)
    logits_b, grads_b = loss_and_grads(fast, batch)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-4, rtol=1e-4)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_autocast_stays_close_to_fp32(batch):
    plain = ImageClassifier(tiny_densenet(), 10, OPTIM)
    fast = ImageClassifier(copy.deepcopy(plain.model), 10, OPTIM, channels_last=True)
    logits_a, grads_a = loss_and_grads(plain, batch)
    logits_b, grads_b = loss_and_grads(fast, batch, autocast=True)
    # bf16 keeps 8 bits of mantissa: about 1% relative error per op, a few % end to end.
    scale = logits_a.abs().max()
    assert (logits_b - logits_a).abs().max() < 0.05 * scale
    assert (logits_b.argmax(1) == logits_a.argmax(1)).float().mean() >= 0.9
    cos = F.cosine_similarity(torch.cat([g.flatten() for g in grads_b.values()]),
                              torch.cat([g.flatten() for g in grads_a.values()]), dim=0)
    assert cos > 0.98


@pytest.mark.parametrize("channels_last,autocast", [(False, False), (True, False), (True, True)],
                         ids=["fp32", "channels_last", "channels_last-bf16"])
def test_memory_efficient_classifier_matches_the_plain_path(batch, channels_last, autocast):
    # Memory-efficient mode combined with the other fast paths computes what they compute
    # without it (bf16: the same bf16 convolutions, so the same tolerance as fp32 almost).
    plain = ImageClassifier(tiny_densenet(), 10, OPTIM, channels_last=channels_last)
    lean_model = tiny_densenet(memory_efficient=True)
    lean_model.load_state_dict(plain.model.state_dict())
    lean = ImageClassifier(lean_model, 10, OPTIM, channels_last=channels_last)
    logits_a, grads_a = loss_and_grads(plain, batch, autocast)
    logits_b, grads_b = loss_and_grads(lean, batch, autocast)
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {}
    torch.testing.assert_close(logits_b, logits_a, **tol)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name, **tol)


def test_speed_defaults_per_device():
    assert use_channels_last("auto", {"accelerator": "cpu", "precision": "32-true"}) is True
    assert use_channels_last("auto", {"accelerator": "gpu", "precision": "bf16-mixed"}) is True
    assert use_channels_last("auto", {"accelerator": "mps"}) is False
    assert use_channels_last(False, {"accelerator": "gpu"}) is False
    assert keep_freed_memory("auto", {"accelerator": "gpu"}) is False
    assert keep_freed_memory(False, {"accelerator": "cpu"}) is False


STEP_FAULTS = """
import resource, sys, torch
from densenet_exp.speed import keep_freed_memory

def step() -> int:
    # Page faults of a stand-in training step: blocks of 40-160 MB alive together, then freed.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(n << 20) for n in (10, 20, 40, 30)]
    sum(b.sum() for b in blocks)
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [step() for _ in range(3)][-1]
on = keep_freed_memory(sys.argv[1], {"accelerator": "cpu"})
print(default, on, *[step() for _ in range(6)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_refaulting_big_blocks():
    # glibc unmaps each freed block over 32 MB, so every step faults all its pages in again;
    # kept in the heap, they are reused once the heap has grown to the step's peak (a step or
    # two). The switch changes no numbers, only this.
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, "auto"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    default, on, steady = int(out[0]), out[1], [int(n) for n in out[-2:]]
    assert on == "True"
    assert default > 50_000 and sum(steady) < default / 20, (default, out[2:])


@pytest.mark.slow
def test_torch_compile_matches_eager(batch):
    eager = ImageClassifier(tiny_densenet(), 10, OPTIM)
    compiled = ImageClassifier(copy.deepcopy(eager.model), 10, OPTIM, compile=True)
    logits_a, grads_a = loss_and_grads(eager, batch)
    logits_b, grads_b = loss_and_grads(compiled, batch)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-4, rtol=1e-4)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-4, rtol=1e-3, msg=name)
