"""Runs without a validation split (data.val_size=0): the paper's final runs train on all 50k
CIFAR images, so nothing validates, only the last checkpoint is kept and the test runs on the
last epoch's weights."""

from __future__ import annotations

from densenet_exp.training.data import has_validation_split


def test_which_data_configs_validate():
    assert has_validation_split({"name": "fashion_mnist", "val_size": 5000})
    assert not has_validation_split({"name": "cifar10", "val_size": 0})
    assert has_validation_split({"name": "imagefolder", "val_size": None})  # it has its own val/ folder
    assert not has_validation_split({"name": "imagefolder", "val_size": 0})  # none held out of train/


def test_paper_recipe_without_validation_split_trains_and_tests_on_the_last_epoch(store):
    result = store.run(
        "experiment=paper_cifar10", "data=synthetic", "data.val_size=0", "trainer.max_epochs=1", "model=densenet_tiny",
        "data.train_size=128", "data.test_size=64", "probes=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("paper_cifar10")
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert "test/acc" in metrics and "val/acc" not in metrics and "val/loss" not in metrics
    assert metrics["test/images"] == 64 and run.data.params["data.val_size"] == "0"
    checkpoints = sorted(p.name for p in (store.path / "out" / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "owner.lock"]  # the lock its owner held while training
