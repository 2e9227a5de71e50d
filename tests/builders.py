"""Builders of synthetic MLflow stores, runs and plans shared by the tests (no test module imports
another: what two need lives here)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.entities import Metric, Param


def add_run(client, experiment_id: str, variant: str, params: dict, metrics: dict, seed: int, data: str,
            status: str = "FINISHED", tags: dict | None = None, artifacts: dict | None = None) -> str:
    run = client.create_run(experiment_id, run_name=variant, tags={"variant": variant, "device": "cpu", **(tags or {})})
    run_id = run.info.run_id
    params = {"data.name": data, "data.num_classes": 10, "trainer.max_epochs": 2, **params, "seed": seed}
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None],
                     params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        for path, content in (artifacts or {}).items():
            file = Path(tmp, path)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(content)
            client.log_artifact(run_id, str(file), str(Path(path).parent))
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id
