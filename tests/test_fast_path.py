"""Every fast path gives the plain path's results within numerical tolerance: channels_last,
bf16 autocast, memory-efficient mode inside the classifier, and torch.compile (slow)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from densenet_exp.classifier import ImageClassifier
from densenet_exp.models import DenseNet
from densenet_exp.run import use_channels_last

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


def test_memory_efficient_classifier_matches_the_plain_path(batch):
    plain = ImageClassifier(tiny_densenet(), 10, OPTIM)
    lean_model = tiny_densenet(memory_efficient=True)
    lean_model.load_state_dict(plain.model.state_dict())
    lean = ImageClassifier(lean_model, 10, OPTIM)
    logits_a, grads_a = loss_and_grads(plain, batch)
    logits_b, grads_b = loss_and_grads(lean, batch)
    torch.testing.assert_close(logits_b, logits_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name)


def test_channels_last_defaults_per_device():
    assert use_channels_last("auto", {"accelerator": "cpu", "precision": "32-true"}) is False
    assert use_channels_last("auto", {"accelerator": "cpu", "precision": "bf16-mixed"}) is True
    assert use_channels_last("auto", {"accelerator": "gpu", "precision": "32-true"}) is True
    assert use_channels_last(False, {"accelerator": "gpu"}) is False


@pytest.mark.slow
def test_torch_compile_matches_eager(batch):
    eager = ImageClassifier(tiny_densenet(), 10, OPTIM)
    compiled = ImageClassifier(copy.deepcopy(eager.model), 10, OPTIM, compile=True)
    logits_a, grads_a = loss_and_grads(eager, batch)
    logits_b, grads_b = loss_and_grads(compiled, batch)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-4, rtol=1e-4)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-4, rtol=1e-3, msg=name)
