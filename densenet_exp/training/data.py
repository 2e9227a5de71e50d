"""Data sets as Lightning data modules.

Data that fits in memory (Fashion-MNIST, CIFAR, synthetic) is held as one uint8 tensor and
served a whole batch per index operation, on the GPU when training runs there: no per-image
PIL decoding, no collation, no worker processes. Image folders (your own data; layout in
datafiles.py) go through torchvision's per-image pipeline with loader processes (`choose_loading`).
"""

from __future__ import annotations

import gzip
import math
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .. import record
from ..datafiles import (FASHION_MNIST_FILES, FASHION_MNIST_HELP, SMALL_IMAGES, check_pixels, find_fashion_mnist,
                         read_image_folder)
from ..options import AUGMENTATIONS  # noqa: F401 (TensorImages' augmentations)

# Per-channel statistics of each training set, for normalization.
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,), (0.25,)),
}
MAX_WORKERS = 8  # loader processes for an image folder, at most


class DataNotFoundError(FileNotFoundError):
    """The data set's files are not where the config says."""


class TensorImages(Dataset):
    """Images (N, C, H, W) uint8 and labels (N,), indexed one batch of indices at a time.

    Normalization and augmentation run on the whole batch, on whatever device the tensors are.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: tuple, std: tuple, augment: str = "none") -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> TensorImages:
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(index, device=self.images.device)
        x = self.images[index].float().div_(255)
        if "crop" in self.augment:
            x = random_crop(x, padding=4)
        if "flip" in self.augment:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean) / self.std, self.labels[index]


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Per-image random crop after zero padding (the paper's "+" augmentation), batched."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, 1, w)
    flat_index = (rows * padded.shape[-1] + cols).expand(n, c, h, w).reshape(n, c, h * w)
    return padded.flatten(2).gather(2, flat_index).view(n, c, h, w)


class IndexBatches(Sampler):
    """Yields lists of indices, one per batch: shuffled with a generator seeded by (seed, epoch)
    so that a resumed run sees the same order, and sharded by rank under DDP."""

    def __init__(
        self, size: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self) -> Tensor:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.size)
        shard = order[self.rank :: self.world_size]
        # Training shards are cut to equal length so every rank takes the same number of steps;
        # evaluation shards keep every image (uneven shards are fine: metrics sync per epoch).
        return shard[: self.size // self.world_size] if self.drop_last else shard

    def __iter__(self) -> Iterator[list[int]]:
        shard = self._shard()
        for batch in shard.split(self.batch_size):
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch.tolist()

    def __len__(self) -> int:
        n = len(self._shard())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class IndexShard(Sampler):
    """This rank's share of a per-image data set (ImageFolder), one index at a time, in the
    order and with the sharding of IndexBatches: under DDP each image is seen once per epoch."""

    def __init__(self, batches: IndexBatches) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch's start
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches._shard().tolist())

    def __len__(self) -> int:
        return len(self.batches._shard())


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_path(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.exists() else folder / f"{name}.gz"


def load_fashion_mnist(root: Path, download: bool) -> dict[str, tuple[Tensor, Tensor]]:
    folder = find_fashion_mnist(root)
    if folder is None and download:
        import torchvision

        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        folder = find_fashion_mnist(root)
    if folder is None:
        raise DataNotFoundError(f"data.root={str(root)!r} holds no Fashion-MNIST files: {FASHION_MNIST_HELP}")
    splits = {}
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        x = torch.from_numpy(read_idx(_idx_path(folder, images)).copy()).unsqueeze(1)
        y = torch.from_numpy(read_idx(_idx_path(folder, labels)).astype(np.int64))
        splits[split] = (x, y)
    return splits


def load_cifar(name: str, root: Path, download: bool) -> dict[str, tuple[Tensor, Tensor]]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = {}
    for split in ("train", "test"):
        try:
            ds = cls(str(root), train=split == "train", download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DataNotFoundError(
                f"data.root={str(root)!r} holds no {name} data ({err}); set data.download=true or point data.root "
                "at a folder with torchvision's cifar-10-batches-py / cifar-100-python"
            ) from err
        splits[split] = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    return splits


def make_synthetic(
    num_classes: int, channels: int, size: int, n_train: int, n_test: int, seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Noise around one fixed random template per class: learnable, for tests only."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, channels, size, size, generator=g)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, channels, size, size, generator=g)
        splits[split] = ((x * 255).to(torch.uint8), y)
    return splits


def has_validation_split(cfg: Mapping[str, Any]) -> bool:
    """Whether runs on this data config validate: an image folder with its own val/ folder
    (val_size null) or `val_size` training images held out (0: train on all, validate on none)."""
    return cfg["val_size"] is None or cfg["val_size"] > 0


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Loading:
    """How a run's batches are loaded: `workers` loader processes (0: in the training process),
    started by `start_method` (None: the process's default), and why (tags loader_workers and
    loader_workers_reason)."""

    workers: int
    start_method: str | None
    reason: str

    def tags(self) -> dict[str, str]:
        return {record.LOADER_WORKERS: str(self.workers), record.LOADER_WORKERS_REASON: self.reason}

    def describe(self) -> str:
        """", 3 loader processes (fork)" for the pre-run block; "" without any."""
        if not self.workers:
            return ""
        return f", {self.workers} loader process{'es' if self.workers > 1 else ''}" + (
            f" ({self.start_method})" if self.start_method else "")


def choose_loading(data: Mapping[str, Any], cores: int, joblib_worker: bool) -> Loading:
    """Loader processes for data config `data` in a job that may use `cores` cores: for an image
    folder, data.num_workers where set, else one per core but one (the training process's), at most
    MAX_WORKERS; none for in-memory data. `joblib_worker`: a joblib launcher (hydra/launcher=
    cpu_parallel, gpu_shared) runs the job in a loky worker process, whose own start method cannot
    start torch's loader processes (every job failed in < 1 s: issue 37), nor can spawn or
    forkserver from there; fork can, where the platform has it, and else the images load in the
    training process."""
    if data["name"] != "imagefolder":
        return Loading(0, None, "in-memory data: batches are indexed whole, no loader processes")
    configured = data.get("num_workers")
    if configured is not None:
        workers, reason = int(configured), "set by data.num_workers"
    else:
        workers = max(0, min(MAX_WORKERS, cores - 1))
        reason = f"auto: one per core of the job's {cores} but one (the training process's), at most {MAX_WORKERS}"
    if workers == 0 or not joblib_worker:
        return Loading(workers, None, reason)
    if "fork" in multiprocessing.get_all_start_methods():
        return Loading(workers, "fork", f"{reason}; started by fork (a joblib launcher's worker process cannot "
                                        "start them by its own start method, loky)")
    return Loading(0, None, "none: a joblib launcher's worker process cannot start loader processes on a platform "
                            "without fork")


class UnreadableImage(OSError):
    """An image of a folder that cannot be decoded; the message names its file."""


def load_rgb(path: str) -> Any:
    """torchvision's image loader, naming the file when it cannot be read (the config checks
    decode every image of a small folder before training, a sample of a large one)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            check_pixels(*image.size)  # from the header, before decoding (the config checks sample a large folder)
            return image.convert("RGB")
    except Exception as err:
        raise UnreadableImage(f"{path}: {type(err).__name__}: {err}") from err


class FolderImages(Dataset):
    """The images of one split of an image folder, as datafiles.read_image_folder listed them
    (links that leave the folder or loop are not followed; each file once), labelled by train/'s
    classes, each loaded with `load_rgb` and transformed."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Any) -> None:
        self.samples, self.transform = list(samples), transform
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


class ImageDataModule(L.LightningDataModule):
    """One data module for every data set of the harness; `cfg` is the `data` config group.

    The config is read here, once, and only the keys this data set uses (an ImageFolder set has
    its own val/ folder and fixed augmentation; in-memory sets load batches without workers)."""

    def __init__(self, cfg: Mapping[str, Any], seed: int = 0, loading: Loading | None = None) -> None:
        super().__init__()
        self.seed = seed
        # A job passes the loading its launcher allows (job.py); outside a job, this process's cores.
        self.loading = loading or choose_loading(cfg, usable_cores(), joblib_worker=False)
        self.name = cfg["name"]
        self.batch_size = cfg["batch_size"]
        self.eval_batch_size = cfg["eval_batch_size"] or self.batch_size
        if self.name == "imagefolder":
            self.root = Path(str(cfg["root"])).expanduser()
            self.image_size = cfg["image_size"]
            self.val_size, self.split_seed = cfg["val_size"], cfg["split_seed"]
        else:
            if self.name == "synthetic":
                self.synthetic = {key: cfg[key] for key in ("num_classes", "channels", "image_size", "seed")}
            else:
                self.root, self.download = Path(str(cfg["root"])).expanduser(), bool(cfg["download"])
            self.val_size, self.split_seed = int(cfg["val_size"]), cfg["split_seed"]
            self.train_size, self.test_size, self.augment = cfg["train_size"], cfg["test_size"], cfg["augment"]
        self.datasets: dict[str, Dataset] = {}

    # Lightning calls setup on every rank; loading is cheap enough to repeat per rank.
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.name == "imagefolder":
            self.datasets = self._image_folders()
            return
        if self.name == "fashion_mnist":
            splits = load_fashion_mnist(self.root, self.download)
        elif self.name in ("cifar10", "cifar100"):
            splits = load_cifar(self.name, self.root, self.download)
        else:
            syn = self.synthetic
            splits = make_synthetic(syn["num_classes"], syn["channels"], syn["image_size"], self.train_size,
                                    self.test_size, syn["seed"])
        x, y = splits["train"]
        # The validation split is fixed by data.split_seed, independent of the training seed,
        # so every run of a sweep is validated on the same images.
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.train_size and self.name != "synthetic":
            train_idx = train_idx[: self.train_size]
        mean, std = STATS[self.name]
        test_x, test_y = splits["test"]
        if self.test_size and self.name != "synthetic":
            test_x, test_y = test_x[: self.test_size], test_y[: self.test_size]
        self.datasets = {
            "train": TensorImages(x[train_idx], y[train_idx], mean, std, self.augment),
            "val": TensorImages(x[val_idx], y[val_idx], mean, std),
            "test": TensorImages(test_x, test_y, mean, std),
        }
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if device is not None and device.type == "cuda":
            for ds in self.datasets.values():
                ds.to(device)

    def _image_folders(self) -> dict[str, Dataset]:
        """train/, and val/ or `val_size` images held out of train/ (by data.split_seed, as for the
        in-memory sets), and test/ only where the folder has one: no test set, no test metric."""
        import torchvision.transforms.v2 as T

        root, size = self.root, self.image_size
        samples = read_image_folder(root).samples
        mean, std = STATS["imagefolder"]
        to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        if size <= SMALL_IMAGES:  # CIFAR's augmentation: pad, random crop and flip, at the images' own size
            train_tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=max(1, size // 8)),
                                  T.RandomHorizontalFlip(), *to_tensor])
            eval_tf = T.Compose([T.Resize(size), T.CenterCrop(size), *to_tensor])
        else:  # ImageNet's
            train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *to_tensor])
            eval_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *to_tensor])
        train = FolderImages(samples["train"], train_tf)
        if self.val_size is None:
            sets = {"train": train, "val": FolderImages(samples["val"], eval_tf)}
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            held_out = FolderImages(samples["train"], eval_tf)  # the same files, without augmentation
            sets = {"train": Subset(train, order[self.val_size:]), "val": Subset(held_out, order[: self.val_size])}
        if "test" in samples:
            sets["test"] = FolderImages(samples["test"], eval_tf)
        return sets

    @property
    def has_test_set(self) -> bool:
        """Whether there is a held-out test set (an image folder without test/ has none)."""
        return self.name != "imagefolder" or (self.root / "test").is_dir()

    def _loader(self, split: str) -> DataLoader:
        ds = self.datasets[split]
        train = split == "train"
        batch_size = self.batch_size if train else self.eval_batch_size
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = IndexBatches(len(ds), batch_size, train, self.seed, drop_last=train, rank=rank, world_size=world)
        if isinstance(ds, TensorImages):
            return DataLoader(ds, sampler=sampler, batch_size=None)
        workers = self.loading.workers
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=IndexShard(sampler),  # the trainer runs with use_distributed_sampler=False
            drop_last=train,
            num_workers=workers,
            multiprocessing_context=self.loading.start_method if workers else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
