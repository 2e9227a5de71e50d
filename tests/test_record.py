"""The run record: each name the report and the notebooks read is written by a real smoke run of
each model family, and the package spells each name out in one place (densenet_exp/record.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import Store
from densenet_exp import record
from densenet_exp.analysis.results import model_family

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# A metric or artifact name as code spells it: "test/acc", "grad/early_rel_init", "x/y.json".
SLASHED_NAME = re.compile(r"""["']([a-z_]+/[a-z_0-9]+(?:\.[a-z]+)?)["']""")


def written(run, client) -> dict[str, set[str]]:
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    for folder in [a.path for a in client.list_artifacts(run.info.run_id) if a.is_dir]:
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, folder)}
    return {"metrics": set(run.data.metrics), "tags": set(run.data.tags), "params": set(run.data.params),
            "artifacts": artifacts}


def notebook_names() -> set[str]:
    """Metric and artifact names the notebooks' code spells out."""
    names = set()
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                names |= set(SLASHED_NAME.findall("".join(cell["source"])))
    return names


@pytest.fixture(scope="module")
def family_runs(tiny_sweep, tmp_path_factory):
    """One FINISHED run per model family: the shared tiny sweep's DenseNet and ResNet, and a plain net."""
    plain = Store(tmp_path_factory.mktemp("plain"))
    result = plain.run("experiment=smoke", "model=plain20")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {}
    for store in (tiny_sweep, plain):
        client = store.client()
        for run in store.runs("smoke"):
            if run.data.tags.get(record.SWEEP) != "parent" and run.data.params.get("seed") == "0":
                runs[run.data.params["model.arch"]] = (run, client)
    assert {model_family(arch) for arch in runs} == {"densenet", "resnet", "plain"}, sorted(runs)
    return runs


def test_every_name_the_report_and_notebooks_read_is_written_by_a_smoke_run_of_each_family(family_runs):
    notebook_metrics = notebook_names()
    assert notebook_metrics, "the notebooks name no metric: the pattern above no longer matches them"
    for arch, (run, client) in family_runs.items():
        wrote = written(run, client)
        wanted = {kind: set(names) for kind, names in record.REPORT_READS.items()}
        if arch.startswith("densenet"):
            for kind, names in record.REPORT_READS_DENSENET.items():
                wanted[kind] |= set(names)
        for kind, names in wanted.items():
            assert names <= wrote[kind], f"{arch}: {kind} read but not written: {sorted(names - wrote[kind])}"
        produced = wrote["metrics"] | wrote["artifacts"]
        missing = {n for n in notebook_metrics - produced if not n.startswith("feature_reuse/") or arch.startswith("densenet")}
        assert not missing, f"{arch}: the notebooks read {sorted(missing)}, which no smoke run writes"


def test_the_package_spells_out_each_metric_and_artifact_name_only_in_record_py():
    """A name like "test/acc" in any other module is a second definition that can drift."""
    defined = {v for v in vars(record).values() if isinstance(v, str) and "/" in v}
    spelled = re.compile(r"[\"'](" + "|".join(re.escape(n) for n in defined) + r")[\"']")
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "densenet_exp").rglob("*.py")) if path.name != "record.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line)]
    # Docstrings and messages may quote a name in backticks; code may not spell it as a string.
    assert not found, "\n".join(found)


def record_name_uses(source: str) -> list[str]:
    """Lines of `source` that spell out a record name (any of record.py's string constants, not
    only those with a "/") where code reads or writes a run's data: a tag, metric or Optuna
    attribute looked up (`tags.get("variant")`, `metrics["epoch_time_s"]`), set or logged
    (`set_tag(run_id, "owner", ...)`, `(("owner", ...), ...)` pairs), or a metric described."""
    names = sorted({v for k, v in vars(record).items() if k.isupper() and isinstance(v, str)}, key=len, reverse=True)
    name = "|".join(re.escape(n) for n in names)
    uses = re.compile(
        rf"""(?:tags|metrics|user_attrs|attrs)(?:\.get\(|\[)\s*["']({name})["']"""  # looked up
        rf"""|\.(?:set_tag|log_metric|set_user_attr|describe|values)\([^)]*?["']({name})["']"""  # set, logged, described
        rf"""|\(\s*["']({name})["']\s*,\s*this_owner\("""  # an owner's attributes
    )
    return [line.strip() for line in source.splitlines() if uses.search(line)]


def test_the_package_spells_out_no_record_name_where_it_reads_or_writes_a_run():
    """`tags.get("variant")` is `tags.get(record.VARIANT)` until record.py renames it; then it
    silently reads nothing."""
    found = [f"{path.relative_to(ROOT)}: {line}" for path in sorted((ROOT / "densenet_exp").rglob("*.py"))
             if path.name != "record.py" for line in record_name_uses(path.read_text())]
    assert not found, "\n".join(found)
    # What it catches: the spellings this test was written against.
    assert record_name_uses('tags.get("variant", "?")\nrun.data.metrics["epoch_time_s"]\n'
                            'attrs.get("owner_lock")\nc.describe("train_images_per_s", ".4g")\n'
                            'for k, v in (("owner", this_owner()),)\n'
                            'tags.get(record.VARIANT)\nmetrics[record.EPOCH_TIME_S]') == [
        'tags.get("variant", "?")', 'run.data.metrics["epoch_time_s"]', 'attrs.get("owner_lock")',
        'c.describe("train_images_per_s", ".4g")', 'for k, v in (("owner", this_owner()),)']
