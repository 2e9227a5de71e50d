"""Bad input to the new commands gives one line naming the key, the value and what is allowed,
never a traceback; names and files stay contained (issue 31)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT
from densenet_exp.analysis.tables import neutralized, render
from densenet_exp.checks import EXIT_BAD_INPUT


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr=inf is invalid: expected a finite number > 0"),
    ("+trainer.max_steps=-5", "trainer.max_steps=-5 is invalid: expected an integer >= -1"),
])
def test_a_bad_run_value_is_one_line(store, override, message):
    code, err = store.run_here("experiment=smoke", override)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert err.count("\n") == 1 and message in err, err
    assert store.runs() == []


def test_an_output_folder_that_cannot_be_made_is_one_line(store):
    result = subprocess.run([sys.executable, "-m", "densenet_exp.run", "experiment=smoke", "hydra.run.dir=/proc/evil"],
                            cwd=ROOT, env=store.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_BAD_INPUT and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "hydra.run.dir='/proc/evil' cannot be created" in result.stderr


def test_an_arm_name_that_would_leave_the_studies_folder_is_refused(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: p\nconfirmation:\n  seeds: [1]\n  arms:\n    ../../../../../escaped: [model=densenet_tiny]\n")
    for command in ("show", "run"):
        result = subprocess.run([sys.executable, "-m", "densenet_exp.study", command, str(plan)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == EXIT_BAD_INPUT and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: confirmation.arms='../../../../../escaped' is invalid")
    assert not (tmp_path / "outputs").exists() and not (tmp_path.parent / "escaped").exists()


def test_csv_cells_a_spreadsheet_would_run_are_neutralised():
    cells = ['=HYPERLINK("http://x","y")', "+1+cmd", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\tx", "\rx",
             "-0.5", "83.4 ± 0.8", "densenet"]
    written = [neutralized(cell) for cell in cells]
    assert [w.startswith("'") for w in written] == [True] * 6 + [False] * 3
    assert [w.removeprefix("'") for w in written] == cells
    assert render(pd.DataFrame({"cell": cells[:1]}), "csv").splitlines()[1].startswith('"\'=HYPERLINK(')


@pytest.fixture
def not_mlflow():
    """An HTTP server that answers every request with a web page: not an MLflow server."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a web page</html>")

        do_GET = do_POST = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def truncated(store) -> str:
    db = store.path / "mlflow.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    return store.uri


def study_run(uri: str, tmp_path) -> list[str]:
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: p\nrecipe: [experiment=smoke]\nconfirmation:\n  seeds: [1]\n  arms:\n    a: [model=densenet_tiny]\n")
    return ["run", str(plan), "--tracking-uri", uri]


@pytest.mark.parametrize("command", ["study", "search"])
@pytest.mark.parametrize("where", ["not_mlflow", "truncated"])
def test_a_store_that_cannot_work_is_one_line(command, where, request, store, tmp_path, monkeypatch, capsys):
    from densenet_exp import search, study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = request.getfixturevalue("not_mlflow") if where == "not_mlflow" else truncated(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if command == "study":
        code = study.main(study_run(uri, tmp_path))
    else:
        code = search.main(["--experiment", "smoke", "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1 and "Traceback" not in err, err
    assert "does not answer as an MLflow tracking server" in err or "is not a usable MLflow store" in err


def test_search_names_a_bad_seed_and_never_creates_a_store(tmp_path, monkeypatch, capsys):
    from densenet_exp import search

    missing = tmp_path / "nope.db"
    with pytest.raises(SystemExit) as exit_:
        search.main(["--experiment", "smoke", "--seeds", "1,x", "--tracking-uri", f"sqlite:///{missing}"])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert "--seeds='1,x' is invalid: expected comma-separated integers >= 0" in capsys.readouterr().err
    assert search.main(["--experiment", "smoke", "--tracking-uri", f"sqlite:///{missing}"]) == EXIT_BAD_INPUT
    assert "there is no MLflow store at" in capsys.readouterr().err and not missing.exists()
