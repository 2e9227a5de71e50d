"""Every fast path gives the plain path's results within numerical tolerance: channels_last,
bf16 autocast, memory-efficient mode inside the classifier, and torch.compile (slow); and `auto`
picks device, precision and speed settings by the capability of the machine (faked here)."""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT
from densenet_exp.training.classifier import ImageClassifier
from densenet_exp.models import DenseNet
from densenet_exp.training.speed import choose_speed, use_channels_last, use_keep_freed_memory
from densenet_exp.identity import config_hash
from densenet_exp.validate import ConfigError

OPTIM = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "scheduler": "constant"}


def tiny_densenet(**kwargs) -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(growth_rate=6, block_config=(2, 3), num_init_features=12, bn_size=2, stem="cifar",
                    in_channels=1, num_classes=10, **kwargs)


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.fixture
def batch():
    return make_batch()


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


def test_speed_switches_per_device():
    assert use_channels_last("auto", "cpu") is True
    assert use_channels_last("auto", "mps") is False
    assert use_channels_last(False, "cpu") is False
    assert use_keep_freed_memory("auto", "gpu") is False
    assert use_keep_freed_memory("auto", "cpu") is sys.platform.startswith("linux")
    assert use_keep_freed_memory(False, "cpu") is False


def test_memory_efficient_mode_reuses_one_workspace_across_steps(batch):
    # The recomputed concatenations, their BN-ReLU and the 1x1 convolution's input gradient go
    # into three buffers sized once for the widest map, reused by every layer and every step.
    model = tiny_densenet(memory_efficient=True).to(memory_format=torch.channels_last)
    x, y = batch[0].contiguous(memory_format=torch.channels_last), batch[1]
    F.cross_entropy(model(x), y).backward()
    buffers = dict(model.workspace.buffers)
    widest = max(block.widest * x.shape[0] * x.shape[2] * x.shape[3] // (2 ** i) ** 2
                 for i, block in enumerate(b for b in model.features if hasattr(b, "widest")))
    assert len(buffers) == 3 and all(buf.numel() == widest for buf in buffers.values())
    F.cross_entropy(model(x), y).backward()
    assert {k: v.data_ptr() for k, v in model.workspace.buffers.items()} == {k: v.data_ptr() for k, v in buffers.items()}
    model.to(torch.float64)
    assert model.workspace.buffers == {}  # a new dtype or device drops the old scratch memory


def fake_cpu(monkeypatch, capability: str, avx512_bf16: bool, amx: bool, onednn_isa: str | None = None) -> None:
    """Pretend to be a CPU of this kind: what torch reports, and oneDNN's ISA cap."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    if onednn_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)


def fake_gpu(monkeypatch, name: str, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


def trainer_cfg(**trainer) -> dict:
    return {"trainer": {"accelerator": "auto", "precision": "auto", "deterministic": "auto", "benchmark": "auto",
                        **trainer}, "speed": {"channels_last": "auto", "keep_freed_memory": "auto"}}


CPU_KINDS = [
    # (id, capability, avx512_bf16, amx, ONEDNN_MAX_CPU_ISA, precision, words of the reason)
    ("sapphire-rapids-amx", "AVX512", True, True, None, "bf16-mixed", "native bf16"),
    ("epyc-zen4-avx512-bf16", "AVX512", True, False, None, "bf16-mixed", "native bf16"),
    ("epyc-avx2-only", "AVX2", False, False, None, "32-true", "without AVX512-BF16 or AMX"),
    ("skylake-avx512-no-bf16", "AVX512", False, False, None, "32-true", "without AVX512-BF16 or AMX"),
    ("amx-imitating-avx2-aten", "AVX2", True, True, None, "32-true", "dispatches to AVX2"),
    ("amx-imitating-avx2-onednn", "AVX512", True, True, "AVX2", "32-true", "ONEDNN_MAX_CPU_ISA=AVX2"),
    ("amx-onednn-capped-at-bf16", "AVX512", True, True, "AVX512_CORE_BF16", "bf16-mixed", "native bf16"),
]


@pytest.mark.parametrize("capability,avx512_bf16,amx,isa,precision,reason", [k[1:] for k in CPU_KINDS],
                         ids=[k[0] for k in CPU_KINDS])
def test_precision_auto_on_each_cpu_kind(monkeypatch, capability, avx512_bf16, amx, isa, precision, reason):
    fake_cpu(monkeypatch, capability, avx512_bf16, amx, isa)
    cfg = trainer_cfg()
    speed = choose_speed(cfg)
    assert (speed.accelerator, speed.precision, speed.cpu_capability) == ("cpu", precision, capability)
    assert reason in speed.precision_reason
    # Written back for Lightning, and into the config hash: bf16 and fp32 are different recipes.
    assert cfg["trainer"]["precision"] == precision and cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["trainer"]["deterministic"] is True and "benchmark" not in cfg["trainer"]
    assert speed.channels_last is True
    tags = speed.tags()
    assert (tags["cpu_capability"], tags["precision"], tags["precision_reason"]) == (
        capability, precision, speed.precision_reason)


@pytest.mark.parametrize("name,bf16,precision", [("NVIDIA H100 80GB HBM3", True, "bf16-mixed"),
                                                 ("Tesla V100-SXM2-16GB", False, "32-true")])
def test_trainer_auto_takes_the_gpu_and_its_precision(monkeypatch, name, bf16, precision):
    fake_cpu(monkeypatch, "AVX2", False, False)
    fake_gpu(monkeypatch, name, bf16)
    cfg = trainer_cfg()
    speed = choose_speed(cfg)
    assert (speed.accelerator, speed.precision) == ("gpu", precision) and name in speed.precision_reason
    assert cfg["trainer"]["deterministic"] is False and cfg["trainer"]["benchmark"] is True
    assert speed.keep_freed_memory is False and speed.channels_last is True


def test_forced_device_and_precision_are_kept(monkeypatch):
    fake_cpu(monkeypatch, "AVX512", True, True)
    fake_gpu(monkeypatch, "NVIDIA H100", True)
    cfg = trainer_cfg(accelerator="cpu", precision="32-true", deterministic=True)
    speed = choose_speed(cfg)
    assert (speed.accelerator, speed.precision, speed.precision_reason) == ("cpu", "32-true", "set by trainer.precision")
    cfg = trainer_cfg(accelerator="cpu")
    assert choose_speed(cfg).precision == "bf16-mixed"  # trainer=cpu: the CPU, but its fast precision


def test_bad_speed_values_name_key_value_and_allowed(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", False, False)
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8' is invalid: expected one of auto, 32-true"):
        choose_speed(trainer_cfg(precision="fp8"))
    with pytest.raises(ConfigError, match=r"trainer.accelerator='gpu' is invalid: expected auto or cpu: no CUDA GPU"):
        choose_speed(trainer_cfg(accelerator="gpu"))


@pytest.mark.parametrize("overrides,compiled,reason", [
    (("experiment=study_fmnist",), False, "auto: 138 training steps, under 1000"),  # 3 epochs of 6000 at batch 128
    # 3 epochs of the 57000 images left beside 3000 for validation, at batch 128: 3 x 445 steps
    (("experiment=study_fmnist", "data.train_size=null"), True, "auto: 1335 training steps, at least 1000"),
    (("experiment=study_fmnist", "data.train_size=null", "model.memory_efficient=true"), False, "memory-efficient"),
    (("experiment=study_fmnist", "speed.compile=true"), True, "set by speed.compile"),
    (("experiment=quickstart",), False, "set by speed.compile"),  # one run on a fresh clone: a cold cache
    (("data=imagefolder",), False, "auto: run length not known from the config"),
], ids=["short", "long", "memory-efficient", "forced", "quickstart", "imagefolder"])
def test_compile_auto_compiles_runs_long_enough_to_pay(monkeypatch, overrides, compiled, reason):
    import shutil

    fake_cpu(monkeypatch, "AVX2", False, False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    cfg = composed(*overrides)
    speed = choose_speed(cfg)
    assert speed.compile is compiled and reason in speed.compile_reason
    # Written back: compiled kernels round differently, so the choice is part of the recipe.
    assert cfg["speed"]["compile"] is compiled and speed.tags()["speed.compile"] == str(compiled).lower()


def test_compile_auto_counts_the_steps_the_run_will_take(monkeypatch):
    import shutil

    from densenet_exp.training.speed import planned_train_steps

    assert planned_train_steps(composed("experiment=quickstart")) == 2 * 644  # as the run prints it
    assert planned_train_steps(composed("experiment=fmnist_decisive")) == 3 * 429
    assert planned_train_steps(composed("experiment=smoke", "+trainer.max_steps=5")) == 5
    ddp = composed("experiment=study_fmnist", "data.train_size=null", "trainer=ddp")
    assert planned_train_steps(ddp) == 3 * (57000 // ddp["trainer"]["devices"] // 128)  # each rank its shard
    fake_cpu(monkeypatch, "AVX2", False, False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    speed = choose_speed(composed("experiment=study_fmnist", "data.train_size=null"))
    assert (speed.compile, speed.compile_reason) == (False, "auto: no C++ compiler for CPU kernels")
    with pytest.raises(ConfigError, match=r"speed.compile='often' is invalid: expected auto, true or false"):
        choose_speed(composed("speed.compile=often"))


def test_a_compiled_classifier_keeps_each_weight_once_and_loads_older_checkpoints():
    # The compiled wrapper is kept out of the module tree: a checkpoint loads whether or not the
    # run that wrote it compiled, and evaluation runs the plain model (no second compiled graph).
    eager = ImageClassifier(tiny_densenet(), 10, OPTIM)
    compiled = ImageClassifier(copy.deepcopy(eager.model), 10, OPTIM, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict()) and all(
        k.startswith("model.") for k in eager.state_dict())
    compiled.eval()
    x = make_batch()[0]
    torch.testing.assert_close(compiled(x), eager.eval()(x))  # eager in eval mode: nothing compiled yet
    older = {"state_dict": {**eager.state_dict(), **{f"forward_fn.{k[6:]}": v for k, v in eager.state_dict().items()}}}
    compiled.on_load_checkpoint(older)
    compiled.load_state_dict(older["state_dict"])  # strict: the second copy is gone


def composed(*overrides: str) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_default_trainer_on_a_cpu_is_the_same_config_as_trainer_cpu(monkeypatch):
    # Same recipe, same config hash: a sweep started either way skips the other's finished runs.
    fake_cpu(monkeypatch, "AVX2", False, False)
    auto, cpu = composed("experiment=smoke"), composed("experiment=smoke", "trainer=cpu")
    assert auto["trainer"]["accelerator"] == "auto" and cpu["trainer"]["accelerator"] == "cpu"
    choose_speed(auto)
    choose_speed(cpu)
    assert auto == cpu and config_hash(auto) == config_hash(cpu)
    assert auto["trainer"]["deterministic"] is True  # same seed, same metrics on a CPU


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_leaves_device_and_precision_to_auto(experiment):
    trainer = composed(f"experiment={experiment}")["trainer"]
    assert (trainer["accelerator"], trainer["precision"]) == ("auto", "auto")


def test_a_run_records_its_speed_choice(store):
    # An AVX2 machine imitated: ATen's kernels capped at AVX2, so bf16 would be emulated.
    env = {**store.env(), "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run(store.command("experiment=smoke", "probes=none", "trainer.max_epochs=1"), cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    tags, params = run.data.tags, run.data.params
    assert (tags["cpu_capability"], tags["precision"], tags["accelerator"]) == ("AVX2", "32-true", "cpu")
    assert "emulated" in tags["precision_reason"] and tags["speed.channels_last"] == "true"
    assert params["trainer.precision"] == "32-true" and params["trainer.accelerator"] == "cpu"


STEP_FAULTS = """
import resource, sys, torch
from densenet_exp.training.speed import keep_freed_memory, use_keep_freed_memory

def step() -> int:
    # Page faults of a stand-in training step: blocks of 40-160 MB alive together, then freed.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(n << 20) for n in (10, 20, 40, 30)]
    sum(b.sum() for b in blocks)
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [step() for _ in range(3)][-1]
on = keep_freed_memory(use_keep_freed_memory(sys.argv[1], "cpu"))
print(default, on, *[step() for _ in range(6)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_refaulting_big_blocks():
    # glibc unmaps each freed block over 32 MB, so every step faults all its pages in again;
    # kept in the heap, they are reused once the heap has grown to the step's peak (a step or
    # two). The switch changes no numbers, only this.
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, "auto"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    default, on, steady = int(out[0]), out[1], [int(n) for n in out[-4:]]
    assert on == "True"
    # Most steps after the heap reached its peak fault nothing; now and then one refaults a block
    # (once in CI: 30720 pages, the 120 MB block, in one of four steps), so the median is judged.
    assert default > 50_000 and statistics.median(steady) < default / 20, (default, out[2:])


# The tiny model, batch and comparison of the tests above, in a process of its own.
COMPILED_VS_EAGER = """
import copy, sys
import torch
sys.path.insert(0, "tests")
from test_fast_path import OPTIM, ImageClassifier, loss_and_grads, make_batch, tiny_densenet

eager = ImageClassifier(tiny_densenet(), 10, OPTIM)
compiled = ImageClassifier(copy.deepcopy(eager.model), 10, OPTIM, compile=True)
logits_a, grads_a = loss_and_grads(eager, make_batch())
logits_b, grads_b = loss_and_grads(compiled, make_batch())
torch.testing.assert_close(logits_b, logits_a, atol=1e-4, rtol=1e-4)
for name, grad in grads_a.items():
    torch.testing.assert_close(grads_b[name], grad, atol=1e-4, rtol=1e-3, msg=name)
"""


@pytest.mark.slow
def test_torch_compile_matches_eager_on_the_cpu_and_with_aten_capped_at_avx2(tmp_path):
    # Each in a fresh process sharing inductor's default kernel cache (under TMPDIR): the cache key
    # leaves ATEN_CPU_CAPABILITY out, and the capped run once reused the first run's kernels and
    # computed NaN. On an AVX2-only CPU both runs are the same.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["TMPDIR"] = str(tmp_path)
    for capability in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        out = subprocess.run([sys.executable, "-c", COMPILED_VS_EAGER], cwd=ROOT, env={**env, **capability},
                             capture_output=True, text=True)
        assert out.returncode == 0, (capability, out.stderr[-3000:])
