"""The committed studies: each study's headline.md, and the README blocks that quote it, are what
the report code computes from the committed runs (runs.jsonl.gz, judged by the study's plan.yaml
where it has one), not hand-copied; and each planned study's confirmation is the one its plan
declared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from densenet_exp import export, record, report
from densenet_exp.claims import load_plan

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
STUDIES = ("study_fmnist", "fmnist_decisive", "fmnist_pair")
PLANNED = ("fmnist_decisive", "fmnist_pair")  # README.md quotes their headlines


@pytest.fixture(scope="module", params=STUDIES)
def study(request, tmp_path_factory) -> tuple[str, str]:
    """(study name, the headline its committed runs give)."""
    folder = RESULTS / request.param
    uri = f"sqlite:///{tmp_path_factory.mktemp(request.param) / 'mlflow.db'}"
    experiment = export.load(folder / "runs.jsonl.gz", uri)
    plan = load_plan(folder / "plan.yaml") if (folder / "plan.yaml").is_file() else None
    found = report.judge(report.load_evidence(experiment, uri), report.DEFAULT_MARGIN_PP, plan)
    return request.param, report.headline(found)


def test_committed_headline_is_what_the_runs_give(study):
    name, headline = study
    assert (RESULTS / name / "headline.md").read_text() == headline


@pytest.mark.parametrize("readme", ["README.md", "docs/results/{name}/README.md"])
def test_readme_blocks_are_the_committed_headline(study, readme):
    """Each study's README quotes its headline; README.md quotes the planned studies'."""
    name, headline = study
    text = (ROOT / readme.format(name=name)).read_text()
    block = re.search(rf"<!-- {name} headline -->\n(.*?)<!-- /{name} headline -->", text, re.S)
    if readme == "README.md" and name not in PLANNED:
        assert block is None or block.group(1) == headline
        return
    assert block, f"{readme.format(name=name)} lacks the {name} headline block"
    assert block.group(1) == headline


def test_first_study_has_three_finished_seeds_per_arm():
    records = export.read(RESULTS / "study_fmnist" / "runs.jsonl.gz")
    arms: dict[str, set[str]] = {}
    for r in records:
        if r["status"] == "FINISHED" and r["tags"].get("sweep") != "parent":
            arms.setdefault(r["tags"]["variant"], set()).add(r["params"]["seed"])
    assert len(arms) == 11 and all(seeds == {"0", "1", "2"} for seeds in arms.values()), arms


@pytest.mark.parametrize("name", PLANNED)
def test_planned_confirmation_is_the_declared_one(name):
    """Every declared arm has each declared seed finished once, under the plan file's hash, by one
    commit, with the init feature-reuse matrices (the control) exported for the DenseNets."""
    folder = RESULTS / name
    plan = load_plan(folder / "plan.yaml")
    runs = [r for r in export.read(folder / "runs.jsonl.gz")
            if r["tags"].get(record.STUDY_STAGE) == "confirmation" and r["status"] == "FINISHED"]
    seen = sorted((r["tags"][record.STUDY_ARM], int(r["params"]["seed"])) for r in runs)
    assert seen == sorted((arm, seed) for arm in plan.arms["confirmation"]
                          for seed in plan.seeds_of("confirmation", arm))
    assert {r["tags"][record.STUDY_PLAN_HASH] for r in runs} == {plan.hash}
    assert len({r["tags"][record.GIT_COMMIT] for r in runs}) == 1
    dense = [r for r in runs if r["tags"][record.STUDY_ARM].startswith("densenet")]
    assert dense and all(record.FEATURE_REUSE_MATRICES_INIT in r["artifacts"] for r in dense)


@pytest.mark.parametrize("name", PLANNED)
def test_plan_was_committed_before_its_first_confirmation_run(name):
    """The git history holds the plan file, byte for byte as its runs' hash tags say, in a commit made
    before the first confirmation run started: the claims were declared before the runs that judge them."""
    import hashlib
    import subprocess

    folder = RESULTS / name
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)  # noqa: E731
    if git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    plan = load_plan(folder / "plan.yaml")
    path = (folder / "plan.yaml").relative_to(ROOT).as_posix()
    commits = git("log", "--format=%H %ct", "--", path).stdout.decode().split("\n")
    times = [int(t) for c, t in (line.split() for line in commits if line)
             if hashlib.sha256(git("show", f"{c}:{path}").stdout).hexdigest() == plan.hash]
    assert times, f"no commit holds {path} as it is now (sha256 {plan.hash[:12]})"
    runs = [r for r in export.read(folder / "runs.jsonl.gz") if r["tags"].get(record.STUDY_STAGE) == "confirmation"]
    first_start = min(r["start_time"] for r in runs) / 1000
    assert min(times) < first_start, (min(times), first_start)
