"""The GPU suite, `pytest -m gpu`: the harness on a CUDA GPU. Skipped where CUDA is missing.

What it checks: a smoke sweep picks the GPU by default and lands in MLflow with the GPU's precision
and peak memory; memory-efficient mode and shared batch statistics (`impl="shared_stats"`) compute
what the plain path computes on CUDA in fp32 and bf16; in-memory data sets live on the GPU and batches are cut there; the bench measures its
ratios on the GPU; step timing waits on the GPU once per epoch, not per step; two runs share one GPU
through `hydra/launcher=gpu_shared`. `benchmarks/gpu_check.sh` runs this suite and the GPU figures in one go.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMOKE = ("experiment=smoke", "probes=none", "probes.size_cost=true")


def test_smoke_sweep_takes_the_gpu_by_default_into_mlflow(store):
    # No trainer=... given: the default trainer=auto must find the GPU by itself.
    result = store.run(*SMOKE, "growth_rate=4,8", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in store.runs("smoke") if r.data.tags.get("sweep") != "parent"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["accelerator"] == "gpu" and tags["device"].startswith("cuda")
        assert tags["gpu"] == torch.cuda.get_device_name(0)
        assert tags["precision"] == params["trainer.precision"] == ("bf16-mixed" if bf16 else "32-true")
        assert params["trainer.deterministic"] == "False" and params["trainer.benchmark"] == "True"
        assert 0 < metrics["test/acc"] <= 1
        # Peak memory is the GPU's (torch.cuda.max_memory_allocated), recorded per run.
        assert metrics["peak_memory_mb"] > 0
        assert metrics["memory/gpu_step_peak_mb"] > 0


def tiny_densenet(**kwargs):
    from densenet_exp.models import DenseNet

    torch.manual_seed(0)
    return DenseNet(growth_rate=6, block_config=(2, 3), num_init_features=12, bn_size=2, stem="cifar",
                    in_channels=1, num_classes=10, **kwargs)


@pytest.mark.parametrize("other", [{"memory_efficient": True}, {"impl": "shared_stats"}],
                         ids=["memory-efficient", "shared-stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_efficient_mode_and_shared_statistics_equal_the_plain_path_on_cuda(dtype, other):
    device = torch.device("cuda")
    plain = tiny_densenet().to(device, memory_format=torch.channels_last)
    lean = tiny_densenet(**other).to(device, memory_format=torch.channels_last)
    lean.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 28, 28, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), generator=g).to(device)
    outputs = []
    for model in (plain, lean):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        outputs.append((logits.float(), {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = outputs
    # TF32 convolutions on Ampere and later keep 10 bits: fp32 agrees to ~1e-3, bf16 to ~1e-2.
    tol = {"atol": 3e-3, "rtol": 3e-3} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(logits_b, logits_a, **tol)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name, **tol)
    # Running statistics advance the same way in both.
    torch.testing.assert_close(lean.state_dict(), plain.state_dict(), **tol)


def test_in_memory_data_lives_on_the_gpu():
    from densenet_exp.training.data import ImageDataModule

    cfg = {"name": "synthetic", "num_classes": 10, "channels": 1, "image_size": 28, "train_size": 256,
           "test_size": 128, "val_size": 64, "batch_size": 32, "eval_batch_size": 64, "seed": 0, "split_seed": 0,
           "augment": "none", "num_workers": 0}
    dm = ImageDataModule(cfg)
    device = torch.device("cuda", torch.cuda.current_device())
    # What the harness's Trainer would be here: rank 0 of 1, on the GPU.
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device), global_rank=0, world_size=1)
    dm.setup("fit")
    for split in ("train", "val", "test"):
        assert dm.datasets[split].images.device == device
    x, y = next(iter(dm.train_dataloader()))
    assert x.device == device and y.device == device and x.shape == (32, 1, 28, 28)
    assert abs(float(x.mean())) < 0.5  # normalized on the GPU


def test_bench_ratios_on_the_gpu():
    entries = "densenet121:fp32fast,densenet121_me:fp32fast,tv_densenet121,tv_densenet121_me"
    cmd = [sys.executable, "-m", "densenet_exp.bench", "--device", "cuda", "--models", entries, "--size", "64",
           "--batch", "8", "--steps", "2", "--warmup", "1", "--num-classes", "10"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("cuda,")
    goals = {line.split(":")[0][2:]: line for line in result.stdout.splitlines() if line.startswith("- ")}
    for goal in ("peak memory ours ME fp32fast / torchvision ME", "train ours ME / ours, both fp32fast"):
        ratio = float(goals[goal].split(": ")[1].split()[0])
        assert ratio > 0, goals[goal]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| densenet121")]
    assert len(rows) == 2 and all("error" not in r for r in rows)


def test_step_timing_on_the_gpu_waits_once_not_every_step(monkeypatch):
    # The size/cost probe times each training step with CUDA events read at the epoch's end: a
    # synchronize per step would keep the host from queueing the next step's kernels.
    from densenet_exp.probes.size_cost import StepTimer

    calls = []
    synchronize = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(a), synchronize(*a, **k))[1])
    x = torch.randn(1024, 1024, device="cuda")
    timer = StepTimer(x.device)
    for _ in range(3):
        timer.start()
        x @ x
        timer.stop()
    assert calls == []
    seconds = timer.seconds()
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


def test_small_runs_share_one_gpu_through_the_gpu_shared_launcher(store):
    # Two jobs at once on one device (hydra/launcher=gpu_shared, joblib processes), both on the GPU.
    result = store.run(*SMOKE, "seed=0,1", "hydra/launcher=gpu_shared", "hydra.launcher.n_jobs=2", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in store.runs("smoke") if r.data.tags.get("sweep") != "parent"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["accelerator"] == "gpu" and r.data.tags["parallel_jobs"] == "2" for r in runs)
