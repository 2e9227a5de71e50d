"""What a data set's files hold, read without torch, so the config checks (validate.py) can say
what is wrong before anything loads: where Fashion-MNIST's idx files are, and what an image
folder holds (its classes, splits, image size and a fingerprint of its content).

An image folder is `root/train/<class>/*.jpg` (required), `root/val/<class>/...` (optional: else
validation images are held out from train/) and `root/test/<class>/...` (optional: else no test
metric at all; the validation images are never reused as a test set). Labels follow train/'s
class folders, sorted by name, in every split.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .checks import require

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_HELP = (
    "install Debian's package (apt-get install dataset-fashion-mnist, which fills "
    "/usr/share/datasets/fashion-mnist), point data.root at a folder with the idx files, "
    "or set data.download=true to let torchvision download it"
)

SPLITS = ("train", "val", "test")
# The files torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS); others are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "a folder with train/<class>/<images> (val/ and test/ optional, with train/'s class folders)"
IMAGENET_SIZE = 224  # larger images are resized to this, as for ImageNet
SMALL_IMAGES = 64  # images up to this size get the CIFAR stem and CIFAR-style augmentation
# Decoding costs memory by pixels, not by file size (a 30 KB PNG can hold 12000x12000): the cap,
# read from each image's header before it is decoded. A 50-megapixel photo passes.
MAX_IMAGE_PIXELS = 50_000_000
CHECK_ALL_UP_TO = 20_000  # images opened and decoded before training; a larger folder: a sample of them
SAMPLE = 2_000


def find_fashion_mnist(root: Path) -> Path | None:
    """The folder holding the idx files: `root` itself (Debian's layout) or torchvision's
    `root/FashionMNIST/raw`."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        name = FASHION_MNIST_FILES["train"][0]
        if (folder / name).exists() or (folder / f"{name}.gz").exists():
            return folder
    return None


@dataclass(frozen=True)
class ImageFolderFacts:
    """What an image folder holds, as `read_image_folder` found it."""

    root: Path  # resolved
    classes: tuple[str, ...]  # train/'s class folders, sorted: label i is classes[i]
    images: dict[str, int]  # images per split present ("train", and "val", "test" where the folder has them)
    samples: dict[str, tuple[tuple[str, int], ...]]  # split -> (image path, label): what each split trains or tests on
    image_size: int  # the median shorter side of the images, at most IMAGENET_SIZE
    fingerprint: str  # of every image's path under root and size in bytes
    checked: int  # images opened and decoded (every one, or a sample of a large folder)

    @property
    def stem(self) -> str:
        return stem_for(self.image_size)


def stem_for(image_size: int) -> str:
    """The model stem the presets use for images of this size: CIFAR's for small images."""
    return "cifar" if image_size <= SMALL_IMAGES else "imagenet"


def _class_folders(split: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))


def _inside(real: str, root: Path) -> bool:
    return real.startswith(f"{root}{os.sep}")


def _images(folder: Path, root: Path, split: str, seen: dict[str, tuple[str, str]],
            walked: set[str]) -> list[tuple[str, int]]:
    """(path, bytes) of every image under `folder`, recursively, as ImageFolder finds them, except
    that a link leaving `root` or leading to a folder walked already (a loop) is not followed, and
    a file reached twice in one split counts once. `seen`: real path -> (split, path) of every
    image so far; `walked`: the real paths of the folders walked so far. InvalidValue where one
    file is an image of two splits (validation or test images would be training images)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if _inside(real, root) and real not in walked:
                walked.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if not _inside(real, root) or not os.path.isfile(real):
                continue
            if real in seen:
                other, first = seen[real]
                require("data.root", str(root), other == split,
                        f"train/, val/ and test/ to share no image: {os.path.relpath(path, root)} is "
                        f"{os.path.relpath(first, root)}")
                continue
            seen[real] = (split, path)
            found.append((path, os.stat(real).st_size))
    return found


def read_image_folder(root: str | Path) -> ImageFolderFacts:
    """The facts of the image folder at `root`, or InvalidValue (key data.root) naming what is
    wrong: no train/ folder, fewer than two classes, a class folder without images, a val/ or
    test/ class that train/ lacks, images that cannot be read."""
    root = Path(str(root)).expanduser().resolve()
    require("data.root", str(root), (root / "train").is_dir(), LAYOUT)
    classes = _class_folders(root / "train")
    require("data.root", str(root), len(classes) >= 2,
            f"a train/ folder with at least two class folders (it holds {len(classes)}: "
            f"{', '.join(classes) or 'none'})")
    files: list[tuple[str, int]] = []
    images, samples = {}, {}
    seen: dict[str, tuple[str, str]] = {}
    # The root, its splits and their class folders are walked as themselves, never through a link.
    walked = {os.path.realpath(root), *(os.path.realpath(root / split / name) for split in SPLITS
                                        if (root / split).is_dir() for name in ("", *_class_folders(root / split)))}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        own = _class_folders(folder)
        for extra in sorted(set(own) - set(classes))[:1]:
            require("data.root", str(root), False,
                    f"{split}/ to hold only train/'s class folders: {split}/{extra} is not in train/")
        split_samples = []
        for name in own:
            found = _images(folder / name, root, split, seen, walked)
            require("data.root", str(root), bool(found),
                    f"every class folder to hold images: {split}/{name} holds none "
                    f"(image files end in {', '.join(IMAGE_EXTENSIONS)})")
            files += found
            split_samples += [(path, classes.index(name)) for path, _ in found]
        images[split], samples[split] = len(split_samples), tuple(split_samples)
    listing = "\n".join(f"{os.path.relpath(p, root)}\t{size}" for p, size in files)
    fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:16]
    size, checked = _check_images(str(root), tuple(p for p, _ in files), fingerprint)
    return ImageFolderFacts(root, tuple(classes), images, samples, size, fingerprint, checked)


def check_pixels(width: int, height: int) -> None:
    """MAX_IMAGE_PIXELS, from an image's header (ValueError: the caller names the file)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}x{height} pixels, more than MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS:_})")


@lru_cache(maxsize=8)
def _check_images(root: str, paths: tuple[str, ...], fingerprint: str) -> tuple[int, int]:
    """Open and decode the images (all, or an even sample of a large folder): (the natural image
    size, images checked); InvalidValue naming the unreadable ones. Cached by content fingerprint:
    the run's config checks and its data module read the folder once."""
    from PIL import Image

    step = 1 if len(paths) <= CHECK_ALL_UP_TO else len(paths) // SAMPLE
    sample = paths[::step]
    sides, bad = [], []
    for path in sample:
        try:
            with Image.open(path) as image:
                width, height = image.size
                check_pixels(width, height)
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG: decode at 1/8 scale
                image.load()  # a truncated or corrupt file fails here
            sides.append(min(width, height))
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, struct.error ...
            bad.append((path, f"{type(err).__name__}: {err}"))
    if bad:
        path, why = bad[0]
        require("data.root", root, False,
                f"readable images: {len(bad)} of {len(sample)} checked cannot be read, e.g. "
                f"{os.path.relpath(path, root)} ({why}); remove or replace them")
    sides.sort()
    return min(sides[len(sides) // 2], IMAGENET_SIZE), len(sample)
