"""The committed Fashion-MNIST study: README's "Results" and docs/results/study_fmnist/headline.md
are what the report code computes from the committed runs (runs.jsonl.gz), not hand-copied."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from densenet_exp import export, report

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "docs" / "results" / "study_fmnist"


@pytest.fixture(scope="module")
def study_headline(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('study') / 'mlflow.db'}"
    experiment = export.load(STUDY / "runs.jsonl.gz", uri)
    return report.headline(report.judge(report.load_evidence(experiment, uri), report.DEFAULT_MARGIN_PP))


def test_committed_headline_is_what_the_runs_give(study_headline):
    assert (STUDY / "headline.md").read_text() == study_headline


def test_readme_results_are_the_committed_headline(study_headline):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- study_fmnist headline -->\n(.*?)<!-- /study_fmnist headline -->", readme, re.S)
    assert block, "README lacks the study's headline block"
    assert block.group(1) == study_headline


def test_every_arm_has_three_finished_seeds():
    records = export.read(STUDY / "runs.jsonl.gz")
    arms: dict[str, set[str]] = {}
    for r in records:
        if r["status"] == "FINISHED" and r["tags"].get("sweep") != "parent":
            arms.setdefault(r["tags"]["variant"], set()).add(r["params"]["seed"])
    assert len(arms) == 11 and all(seeds == {"0", "1", "2"} for seeds in arms.values()), arms
