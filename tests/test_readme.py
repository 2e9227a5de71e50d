"""Every command README.md gives runs: training commands compose and pass the harness's checks
(the config a job would train, without training it), the other module commands and tools answer
--help, and each `make` target exists (`make -n`)."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from densenet_exp.training.trainer_keys import trainer_arguments
from densenet_exp.validate import checked_config

ROOT = Path(__file__).resolve().parent.parent
# Placeholders README writes in angle brackets, and what stands in for them here.
PLACEHOLDERS = {"<parent run id>": "0123456789abcdef0123456789abcdef", "<time>": "2026-01-01"}


def readme_commands() -> list[str]:
    """The commands of README's bash blocks: continuation lines joined, comments and env vars dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith(("#", "source ")):
                commands.append(line)
    return commands


def words(command: str) -> list[str]:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    parts = shlex.split(command)
    while parts and re.fullmatch(r"[A-Z_]+=\S*", parts[0]):  # FOO=bar python -m ...
        parts.pop(0)
    return parts


COMMANDS = readme_commands()
TRAINING = [c for c in COMMANDS if "densenet_exp.run" in c and "--help" not in c and "..." not in c]
MODULES = sorted({w[w.index("-m") + 1] for c in COMMANDS if "densenet_exp." in c
                  for w in [words(c)] if "-m" in w and w[w.index("-m") + 1].startswith("densenet_exp.")})
MAKE_TARGETS = sorted({t for c in COMMANDS for w in [words(c)] if w and w[0] == "make"
                       for t in w[1:] if "=" not in t and not t.startswith("-")})


def test_readme_has_the_commands_it_is_read_for():
    assert any("experiment=quickstart" in c for c in TRAINING) and "densenet_exp.report" in MODULES
    assert {"run", "test"} <= set(MAKE_TARGETS)


def image_folder(root: Path) -> None:
    from PIL import Image

    for split, cls, i in itertools.product(("train", "test"), ("cat", "dog"), range(40)):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (i * 6, 0, 0) if cls == "cat" else (0, i * 6, 0)).save(root / split / cls / f"{i}.png")


def first_job(overrides: list[str]) -> list[str]:
    """One job of a sweep: the first value of each comma list (the others are the same keys)."""
    return [o.split("=", 1)[0] + "=" + o.split("=", 1)[1].split(",")[0] if "=" in o and "," in o else o
            for o in overrides]


@pytest.mark.parametrize("command", TRAINING)
def test_each_training_command_composes_and_passes_the_checks(command, monkeypatch, tmp_path):
    args = words(command)
    overrides = [a for a in args[args.index("densenet_exp.run") + 1:] if a not in ("-m", "--multirun")]
    job = first_job(overrides)
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "pets")  # the folder README's own-data command names
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=job, return_hydra_config=True)  # hydra/* groups must exist too
    with open_dict(cfg):
        del cfg["hydra"]  # resolved by Hydra's runtime, which a composed config lacks
    checked_config(cfg, [o for o in job if not o.startswith(("hydra", "hparams_search"))], trainer_arguments)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_command_answers_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


def test_each_make_target_exists():
    for target in MAKE_TARGETS:
        proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "No rule to make target" not in proc.stderr, (target, proc.stderr)


@pytest.mark.parametrize("group", ["model", "experiment"])
def test_the_config_group_table_lists_every_preset(group):
    row = re.search(rf"^\| `{group}` \|(.*)\|$", (ROOT / "README.md").read_text(), re.M)
    assert row, f"README's config-group table has no `{group}` row"
    listed = set(re.findall(r"`([\w.]+)`", row.group(1)))
    assert listed == {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}


def test_readme_serves_the_researcher_first():
    """Issue 37: the first screen says what the tool is, gives the two commands and points to the
    own-data walkthrough, which comes before the study results."""
    text = (ROOT / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:40])
    assert "make run" in first_screen and "make test" in first_screen and "(#your-own-data)" in first_screen
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings.index("Your own data") < headings.index("Results")
    walkthrough = text[text.index("## Your own data"):text.index("## Results")]
    assert "densenet_exp.report" in walkthrough and "model=densenet_small,resnet20" in walkthrough
