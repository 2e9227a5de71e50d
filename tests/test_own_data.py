"""A researcher's own folder of images (data=imagefolder): class count, image size and stem read
from the folder, validation held out of train/ without val/, no test metric without test/, and
every way the folder or the batch can be wrong said in one line before any run exists."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, Store
from densenet_exp import datafiles
from densenet_exp.training.data import ImageDataModule, choose_loading, has_validation_split
from densenet_exp.training.trainer_keys import trainer_arguments
from densenet_exp.validate import ConfigError, checked_config

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def image_folder(root: Path, splits: dict[str, int], classes: int = 3, size: int = 32) -> Path:
    """`root/<split>/class<c>/<i>.png`: `splits[split]` images per class, one noisy colour per class
    (learnable in a few steps)."""
    from PIL import Image

    rng = random.Random(0)
    for split, n in splits.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = tuple(max(0, min(255, v + rng.randint(-50, 50))) for v in COLOURS[c])
                Image.new("RGB", (size, size), colour).save(folder / f"{i}.png")
    return root


def checked(*overrides: str) -> dict:
    """The config a job would train, checked as run.py checks it (no run, no torch)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=imagefolder", "model=densenet_tiny", "data.batch_size=2", *overrides])
    return checked_config(cfg, overrides, trainer_arguments)


def test_class_count_image_size_and_stem_come_from_the_folder(tmp_path):
    root = image_folder(tmp_path / "pets", {"train": 5, "val": 2})
    plain = checked(f"data.root={root}")
    data, model = plain["data"], plain["model"]
    assert (data["num_classes"], data["image_size"], data["stem"]) == (3, 32, "cifar")
    assert (model["num_classes"], model["stem"]) == (3, "cifar")  # the model follows the data
    assert data["val_size"] is None and has_validation_split(data)  # val/ is the validation split
    big = image_folder(tmp_path / "big", {"train": 2}, classes=2, size=300)
    plain = checked(f"data.root={big}")
    assert (plain["data"]["image_size"], plain["data"]["stem"], plain["data"]["val_size"]) == (224, "imagenet", 1)
    # A value given on the command line wins over the folder's.
    assert checked(f"data.root={root}", "data.image_size=64")["data"]["image_size"] == 64


def test_a_run_that_names_no_experiment_goes_to_one_named_for_its_data_and_preset(tmp_path):
    """Issue 37: runs without tracking.experiment all went to `densenet_exp`, beside unrelated ones."""
    from omegaconf import OmegaConf

    from densenet_exp.config import default_experiment
    from densenet_exp.validate import fill_experiment

    root = image_folder(tmp_path / "my pets+", {"train": 5, "val": 2})
    assert checked(f"data.root={root}")["tracking"]["experiment"] == "imagefolder-my pets_"  # a safe name
    assert checked(f"data.root={root}", "tracking.experiment=mine")["tracking"]["experiment"] == "mine"
    assert default_experiment({"name": "fashion_mnist"}, "smoke") == "fashion_mnist-smoke"
    assert default_experiment({"name": "cifar10", "root": "/data"}, None) == "cifar10"
    # A sweep over what the name is made of would scatter its jobs: it must name one.
    cfg = OmegaConf.create({"tracking": {"experiment": None}, "data": {"name": "fashion_mnist"}})
    with pytest.raises(ConfigError, match=r"tracking.experiment=.*varies data.root"):
        fill_experiment(cfg, None, swept=("seed", "data.root"))
    fill_experiment(cfg, None, swept=("seed",))
    assert cfg.tracking.experiment == "fashion_mnist"


def test_without_val_a_tenth_of_train_validates_and_without_test_nothing_is_tested(tmp_path):
    root = image_folder(tmp_path / "pets", {"train": 10})
    data = checked(f"data.root={root}")["data"]
    assert data["val_size"] == 3  # a tenth of the 30 training images
    dm = ImageDataModule(data)
    dm.setup()
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (27, 3)
    assert "test" not in dm.datasets and not dm.has_test_set  # val/ never stands in for a test set
    again = ImageDataModule(data)
    again.setup()
    assert dm.datasets["val"].indices == again.datasets["val"].indices  # fixed by data.split_seed
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 32, 32) and set(y.tolist()) <= {0, 1, 2}


def test_a_test_folder_lacking_a_class_keeps_train_labels(tmp_path):
    root = image_folder(tmp_path / "pets", {"train": 4, "test": 2})
    for png in (root / "test" / "class0").iterdir():
        png.unlink()
    (root / "test" / "class0").rmdir()
    data = checked(f"data.root={root}")["data"]
    dm = ImageDataModule(data)
    dm.setup()
    assert dm.has_test_set and sorted(set(dm.datasets["test"].targets)) == [1, 2]  # not relabelled 0, 1


def test_the_fingerprint_and_root_tell_folders_apart(tmp_path):
    a = image_folder(tmp_path / "a", {"train": 3})
    b = image_folder(tmp_path / "b", {"train": 3})
    first = datafiles.read_image_folder(a).fingerprint
    assert datafiles.read_image_folder(b).fingerprint == first  # same names and sizes
    image_folder(a, {"train": 4})  # one more image per class
    assert datafiles.read_image_folder(a).fingerprint != first
    assert checked(f"data.root={a}")["data"]["root"] == str(a.resolve())


@pytest.mark.parametrize("case, expected", [
    ("no_train", "expected a folder with train/<class>/<images>"),
    ("one_class", "at least two class folders (it holds 1: class0)"),
    ("empty_class", "every class folder to hold images: train/class1 holds none"),
    ("stray_class", "val/ to hold only train/'s class folders: val/bird is not in train/"),
    ("corrupt", "readable images: 1 of 12 checked cannot be read, e.g. train/class2/0.png"),
])
def test_a_folder_that_cannot_work_is_one_line_naming_data_root(tmp_path, case, expected):
    root = tmp_path / "pets"
    if case == "no_train":
        image_folder(root, {"val": 2})
    elif case == "one_class":
        image_folder(root, {"train": 3}, classes=1)
    else:
        image_folder(root, {"train": 3, "val": 1})
    if case == "empty_class":
        for png in (root / "train" / "class1").iterdir():
            png.unlink()
    elif case == "stray_class":
        (root / "val" / "bird").mkdir()
    elif case == "corrupt":
        (root / "train" / "class2" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError) as err:
        checked(f"data.root={root}")
    message = str(err.value)
    assert message.startswith(f"data.root='{root.resolve() if case != 'no_train' else root}' is invalid: ")
    assert expected in message and "\n" not in message


def test_a_batch_larger_than_the_training_set_fails_in_one_line_and_leaves_no_run(store: Store, tmp_path):
    root = image_folder(tmp_path / "pets", {"train": 10})  # 30 images, 3 held out: 27 to train on
    code, stderr = store.run_here("data=imagefolder", f"data.root={root}", "data.batch_size=64",
                                  "model=densenet_tiny")
    assert code == 2 and stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith("error: data.batch_size=64 is invalid: expected at most the training set's size "
                             "(27 images): lower data.batch_size or add images to train/ or lower data.val_size")
    assert store.all_runs() == [] and not (store.path / "out").exists()


def launched_by(launcher: str | None):
    """Hydra's runtime config (HydraConfig) of a job that `hydra/launcher=<launcher>` starts."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"] if launcher else [], return_hydra_config=True)
    return cfg.hydra


def test_loader_processes_follow_the_jobs_share_of_the_cores_and_start_as_its_launcher_allows(monkeypatch):
    """Issue 37: under cpu_parallel every job on a folder failed in < 1 s: a joblib launcher's job
    runs in a loky worker, whose start method cannot start torch's loader processes."""
    from densenet_exp.job import in_joblib_worker, job_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    folder = {"name": "imagefolder", "num_workers": None}

    def loading(hc, data=folder):
        return choose_loading(data, job_cores(hc), in_joblib_worker(hc))

    alone = loading(launched_by(None))  # Hydra's own launcher: the job in this process
    assert (alone.workers, alone.start_method) == (8, None) and "at most 8" in alone.reason
    shared = loading(launched_by("gpu_shared"))  # 4 jobs side by side: 4 cores each
    assert (shared.workers, shared.start_method) == (3, "fork") and "joblib launcher" in shared.reason
    assert loading(launched_by("cpu_parallel")).workers == 0  # one job per core: no core to spare
    asked = loading(launched_by("cpu_parallel"), {**folder, "num_workers": 2})
    assert (asked.workers, asked.start_method) == (2, "fork") and asked.reason.startswith("set by data.num_workers")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # the node's 16 cores are not the job's
    assert (loading(launched_by("slurm_local")).workers, loading(launched_by("slurm_local")).start_method) == (2, None)
    monkeypatch.setattr("multiprocessing.get_all_start_methods", lambda: ["spawn"])  # no fork on this platform
    assert loading(launched_by("gpu_shared")).workers == 0
    assert choose_loading({"name": "fashion_mnist", "num_workers": 0}, 16, True).workers == 0  # batches in memory


def test_a_bad_override_is_rejected_before_torch_lightning_or_mlflow_load(tmp_path):
    """What makes a rejection take seconds is importing them: none is imported on the way."""
    code = ("import atexit, runpy, sys; "
            "atexit.register(lambda: print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules), "
            "file=sys.stderr)); "
            f"sys.argv = ['run', 'growth_rate=-3', 'hydra.run.dir={tmp_path / 'out'}']; "
            "runpy.run_module('densenet_exp.run', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: growth_rate=-3 is invalid: expected an integer >= 1", "[]"]


# --- one real run on a folder, read back by the report (slow: it trains) ---------------------------


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Two epochs of densenet_tiny on a 3-class folder of 32 px images without test/, its output
    piped (as in a SLURM .out file) with the progress bar asked for."""
    tmp = tmp_path_factory.mktemp("own")
    root = image_folder(tmp / "pets", {"train": 20, "val": 6})
    store = Store(tmp)
    result = store.run("data=imagefolder", f"data.root={root}", "model=densenet_tiny", "probes=none",
                       "trainer.max_epochs=2", "trainer.enable_progress_bar=true", "data.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    return store, result


@pytest.mark.slow
def test_a_folder_without_test_trains_its_classes_at_its_size_with_no_test_metric(folder_run, tmp_path):
    from densenet_exp.report import write_report

    store, result = folder_run
    (run,) = store.runs("imagefolder-pets")  # named from the data set: the run names none
    params, metrics = run.data.params, run.data.metrics
    assert (params["data.num_classes"], params["model.num_classes"], params["data.image_size"]) == ("3", "3", "32")
    assert params["model.stem"] == "cifar" and "val/acc" in metrics
    assert not any(key.startswith("test/") for key in metrics)
    assert "no held-out test set" in result.stdout
    report = (tmp_path / "report")
    write_report("imagefolder-pets", store.uri, report)
    assert "no held-out test set for 1 run(s) (densenet_tiny-k4-c0.5-B)" in (report / "report.md").read_text()


@pytest.mark.slow
def test_piped_output_has_one_line_per_epoch_and_no_bar(folder_run):
    _, result = folder_run
    out = result.stdout
    assert "\r" not in out and "\x1b" not in out  # no bar redrawing itself, no escape codes
    assert len(re.findall(r"^epoch \d/2: train loss [\d.]+, val acc [\d.]+ \(", out, re.M)) == 2, out
    assert re.search(r"^densenet_tiny-k4-c0.5-B-s0: MLflow run \w+ in experiment 'imagefolder-pets' \(named from", out,
                     re.M), out
    # Third-party INFO and warnings stay in run.log: Lightning's device banner and UserWarnings,
    # MLflow's and Hydra's notices; nothing but the harness's lines reaches the console.
    assert "GPU available" not in out and "INFO" not in out and result.stderr == "", result.stderr
    assert "GPU available" in (store_out := Path(result.args[-1].split("=", 1)[1]) / "run.log").read_text(), store_out


@pytest.mark.slow
def test_a_parallel_sweep_on_a_folder_without_test_finishes_every_job(store, tmp_path):
    """Issue 37: with hydra/launcher=cpu_parallel every job on a folder FAILED in < 1 s (the loky
    worker that runs a job cannot start loader processes by its own start method). A 4-class
    32x32 RGB folder without test/, each job with a loader process of its own (on a 2-core
    machine the preset's one job per core leaves none to spare)."""
    root = image_folder(tmp_path / "pets", {"train": 12, "val": 4}, classes=4)
    result = store.run("data=imagefolder", f"data.root={root}", "model=densenet_tiny", "probes=none",
                       "trainer.max_epochs=1", "data.batch_size=8", "data.num_workers=1", "seed=0,1",
                       "hydra/launcher=cpu_parallel", "tracking.experiment=own", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "of the sweep failed" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    runs = [r for r in store.runs("own") if r.data.tags.get("sweep") != "parent"]
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    for run in runs:
        assert run.info.status == "FINISHED" and "val/acc" in run.data.metrics
        assert not any(key.startswith("test/") for key in run.data.metrics)  # no test/ folder, no test metric
        assert run.data.tags["loader_workers"] == "1" and "started by fork" in run.data.tags["loader_workers_reason"]
    table = result.stdout[result.stdout.index("\nSweep "):]
    assert len(re.findall(r"\n\s+[12]\s+densenet_tiny-k4-c0.5-B\s+[01]\s+FINISHED\s", table)) == 2, table


def test_links_that_loop_or_leave_the_folder_are_not_followed_and_a_file_counts_once(tmp_path):
    """Issue 31: two symlink loops hung the launch; one counted 24 files as 984 images."""
    root = image_folder(tmp_path / "pets", {"train": 4, "val": 2})  # 3 classes
    outside = image_folder(tmp_path / "elsewhere", {"train": 5})
    (root / "train" / "class0" / "loop").symlink_to(root / "train")
    (root / "train" / "class1" / "back").symlink_to(root / "train" / "class1")
    (root / "train" / "class2" / "out").symlink_to(outside / "train" / "class0")
    first = next((root / "train" / "class0").glob("*.png"))
    (root / "train" / "class0" / "again.png").symlink_to(first)
    facts = datafiles.read_image_folder(root)
    assert facts.images == {"train": 12, "val": 6}
    assert len({path for path, _ in facts.samples["train"]}) == 12


def test_an_image_in_two_splits_is_refused(tmp_path):
    root = image_folder(tmp_path / "pets", {"train": 4, "val": 2})
    first = next((root / "train" / "class0").glob("*.png"))
    (root / "val" / "class0" / "copy.png").symlink_to(first)
    with pytest.raises(ConfigError, match=r"train/, val/ and test/ to share no image: val/class0/copy.png is "
                                          r"train/class0/"):
        datafiles.read_image_folder(root)


def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import Image

    root = image_folder(tmp_path / "pets", {"train": 4})
    Image.new("L", (400, 300)).save(root / "train" / "class0" / "huge.png")  # stands for 12000x12000
    monkeypatch.setattr(datafiles, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ConfigError, match=r"400x300 pixels, more than MAX_IMAGE_PIXELS \(100_000\)"):
        datafiles.read_image_folder(root)
