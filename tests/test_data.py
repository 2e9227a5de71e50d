"""Data served as tensors: the Debian Fashion-MNIST files, the fixed validation split, batched
augmentation, and index batches that are reproducible per epoch and sharded per rank."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from densenet_exp.training.data import (
    IndexBatches,
    ImageDataModule,
    TensorImages,
    find_fashion_mnist,
    random_crop,
    read_idx,
)
from densenet_exp.datafiles import read_image_folder
from densenet_exp.validate import ConfigError, validate_data

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CFG = {
    "name": "fashion_mnist",
    "root": str(FMNIST),
    "batch_size": 64,
    "eval_batch_size": 500,
    "val_size": 5000,
    "split_seed": 0,
    "augment": "none",
    "num_classes": 10,
    "channels": 1,
    "image_size": 28,
    "download": False,
    "train_size": None,
    "test_size": None,
    "num_workers": 0,
}


def test_fashion_mnist_loads_with_a_fixed_validation_split():
    dm = ImageDataModule(FMNIST_CFG, seed=0)
    dm.setup()
    train, val, test = dm.datasets["train"], dm.datasets["val"], dm.datasets["test"]
    assert (len(train), len(val), len(test)) == (55_000, 5_000, 10_000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    # Fashion-MNIST's test set has exactly 1,000 images per class.
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # The split depends on split_seed only, not on the training seed.
    other = ImageDataModule(FMNIST_CFG, seed=123)
    other.setup()
    assert torch.equal(other.datasets["val"].labels, val.labels)
    x, y = val[list(range(8))]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,)
    # Normalized with the training statistics: the validation mean is near 0, std near 1.
    xs, _ = val[list(range(2000))]
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05


def test_torchvision_layout_and_plain_idx_files_are_found(tmp_path: Path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    header = bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in images.shape)
    (raw / "train-images-idx3-ubyte").write_bytes(header + images.tobytes())
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([7, 3]))
    assert find_fashion_mnist(tmp_path) == raw
    assert np.array_equal(read_idx(raw / "train-images-idx3-ubyte"), images)
    assert read_idx(raw / "train-labels-idx1-ubyte.gz").tolist() == [7, 3]
    assert find_fashion_mnist(tmp_path / "elsewhere") is None


def test_missing_data_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.root=.*dataset-fashion-mnist.*data.download=true"):
        validate_data({**FMNIST_CFG, "root": str(tmp_path)})


def test_index_batches_are_reproducible_per_epoch_and_sharded():
    a = IndexBatches(100, 10, shuffle=True, seed=1, drop_last=True)
    b = IndexBatches(100, 10, shuffle=True, seed=1, drop_last=True)
    assert list(a) == list(b) and len(list(a)) == len(a) == 10
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first  # a new order each epoch
    assert sorted(i for batch in first for i in batch) == list(range(100))
    ranks = [IndexBatches(100, 10, True, 1, True, rank=r, world_size=2) for r in range(2)]
    seen = [set(i for batch in s for i in batch) for s in ranks]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 50
    ordered = IndexBatches(25, 10, shuffle=False, seed=0, drop_last=False)
    assert [len(b) for b in ordered] == [10, 10, 5] and len(ordered) == 3


def test_random_crop_shifts_each_image_within_the_padding():
    torch.manual_seed(0)
    x = torch.arange(64 * 36, dtype=torch.float32).view(64, 1, 6, 6) + 1
    out = random_crop(x, padding=2)
    assert out.shape == x.shape
    for img, src in zip(out, x):
        nonzero = img[img > 0]
        # Every surviving pixel comes from the same image, and at least a 2x2 core survives.
        assert set(nonzero.tolist()) <= set(src.flatten().tolist()) and len(nonzero) >= 4
    assert not torch.equal(out, x)


def test_flip_augmentation_mirrors_about_half_the_images():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (400, 1, 4, 4), dtype=torch.uint8)
    ds = TensorImages(images, torch.zeros(400, dtype=torch.long), (0.0,), (1.0,), augment="flip")
    x, _ = ds[list(range(400))]
    plain = images.float() / 255
    flipped = (x == plain.flip(-1)).flatten(1).all(1) & ~(x == plain).flatten(1).all(1)
    assert 150 < flipped.sum().item() < 250


def test_image_folder_serves_resized_normalized_batches(tmp_path: Path):
    from PIL import Image

    for split in ("train", "val"):
        for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20 + i, 18), color).save(folder / f"{i}.png")
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "batch_size": 4, "eval_batch_size": None,
           "num_workers": 0, "num_classes": 2, "stem": "cifar", "val_size": None, "split_seed": 0,
           "fingerprint": read_image_folder(tmp_path).fingerprint}
    validate_data(cfg)
    dm = ImageDataModule(cfg)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and sorted(set(y.tolist())) <= [0, 1]
    assert "test" not in dm.datasets  # no test/ folder: no test set (val/ never doubles as one)
    with pytest.raises(ConfigError, match=r"data.root=.* expected a folder with train/<class>/<images>"):
        validate_data({**cfg, "root": str(tmp_path / "train")})


def test_synthetic_data_is_seeded_and_learnable_in_shape():
    cfg = {"name": "synthetic", "num_classes": 3, "channels": 1, "image_size": 8, "train_size": 64,
           "test_size": 16, "val_size": 16, "seed": 5, "batch_size": 8, "eval_batch_size": None, "split_seed": 0,
           "augment": "none", "num_workers": 0}
    a, b = ImageDataModule(cfg), ImageDataModule(cfg)
    a.setup()
    b.setup()
    assert torch.equal(a.datasets["train"].images, b.datasets["train"].images)
    assert (len(a.datasets["train"]), len(a.datasets["val"]), len(a.datasets["test"])) == (48, 16, 16)
