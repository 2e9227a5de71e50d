"""Bad input to the new commands gives one line naming the key, the value and what is allowed,
never a traceback; names and files stay contained (issue 31)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT
from densenet_exp.analysis.tables import neutralized, render
from densenet_exp.checks import EXIT_BAD_INPUT, EXIT_NO_ROOM


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


# Loaded by every Python process started with this folder on PYTHONPATH: the FULL_DISK_AT-th
# epoch checkpoint (Lightning writes it to a temporary file, then moves it into place) fails to
# land as on a full disk.
FULL_DISK = """
import errno, os, shutil
_move, _seen = shutil.move, [0]
def _full(src, dst, *args, **kwargs):
    if str(dst).endswith("pending.ckpt"):
        _seen[0] += 1
        if _seen[0] == int(os.environ["FULL_DISK_AT"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return _move(src, dst, *args, **kwargs)
if os.environ.get("FULL_DISK_AT"):
    shutil.move = _full
"""


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_stops_the_run_killed_and_the_same_command_resumes_it(store, tmp_path):
    from conftest import assert_clean

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK)
    command = store.command("experiment=smoke", "probes=none")  # two epochs: the second's checkpoint fails
    env = {**store.env(), "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(hook)]))}
    full = subprocess.run(command, cwd=ROOT, env={**env, "FULL_DISK_AT": "2"}, capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == EXIT_NO_ROOM and "Traceback" not in full.stderr, full.stderr[-3000:]
    (line,) = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert "no room left on the device writing the checkpoint" in line and "resume it with: python -m" in line
    (run,) = store.runs()
    assert run.info.status == "KILLED" and "free space, then the same command resumes it" in run.data.tags["stop_reason"]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (resumed,) = store.runs()
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert_clean(store)


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "description: *i\n"


@pytest.mark.parametrize("text, message", [
    ("name: p\n" + LAUGHS, "is invalid: expected a YAML file with at most 20 aliases (*name; it has 73)"),
    ("name: p\ndescription: " + "x" * (1 << 20) + "\n", "is invalid: expected a YAML file of at most 1048576 bytes"),
    ("name: p\nconvergence: {max_gain_pp: lots}\n", "convergence.max_gain_pp='lots' is invalid: expected a number >= 0"),
    ("name: p\nalpha: [" + ", ".join(["0.5"] * 10_000) + "]\n", "alpha=[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, ...] is invalid"),
])
def test_a_plan_that_would_hang_or_crash_study_show_is_one_short_line(tmp_path, text, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    result = subprocess.run([sys.executable, "-m", "densenet_exp.study", "show", str(plan)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_BAD_INPUT and result.stderr.count("\n") == 1, result.stderr[:2000]
    assert message in result.stderr and len(result.stderr) < 1000


def test_study_show_is_linear_in_seeds(tmp_path):
    from densenet_exp.plan import load_plan

    def jobs(n: int) -> float:
        plan = tmp_path / f"plan{n}.yaml"
        plan.write_text(f"name: p\nconfirmation:\n  seeds: [{', '.join(map(str, range(n)))}]\n  arms:\n"
                        "    a: [model=densenet_tiny]\n    b: [model=resnet20]\n")
        started = time.perf_counter()
        assert len(load_plan(plan).jobs("confirmation")) == 2 * n
        return time.perf_counter() - started

    jobs(1000)  # warm
    assert jobs(40_000) < 40 * jobs(1000) * 4 + 1  # linear: 40x (quadratic: 1600x)


def test_a_search_on_a_corrupt_optuna_store_is_one_line(store):
    (store.path / "optuna.db").write_bytes(b"garbage, not a database " * 200)
    result = subprocess.run(store.command("hparams_search=optuna", "experiment=smoke", "hydra.sweeper.n_trials=1",
                                          multirun=True), cwd=ROOT, env=store.env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == EXIT_BAD_INPUT and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "optuna.db' is not a usable Optuna storage (" in line and store.runs() == []


def test_a_report_on_a_run_whose_start_time_is_text_is_one_line(store, tmp_path, capsys):
    """A store that an older `export load` gave `start_time: "yesterday"`."""
    from densenet_exp import report

    client = store.client()
    run = client.create_run(client.create_experiment("x"), start_time="yesterday")
    client.set_terminated(run.info.run_id, "FINISHED")
    capsys.readouterr()
    assert report.main(["--experiment", "x", "--tracking-uri", store.uri, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"start_time of run {run.info.run_id} in experiment 'x'='yesterday' is invalid" in err


@pytest.mark.parametrize("rule", ["", "settled: {tolerance_pp: 0.2}\n", "convergence: {max_gain_pp: 0.3}\n"])
def test_a_confirmation_with_claims_starts_only_under_a_declared_rule(rule, tmp_path, monkeypatch, capsys):
    """Issue 30: the settled rule is declared, never a silent default; a plan that names the older
    window keeps it. Refused in one line before any run, the store untouched."""
    from densenet_exp import study

    plan = tmp_path / "plan.yaml"
    plan.write_text("name: p\nrecipe: [experiment=smoke]\n" + rule + "confirmation:\n  seeds: [1, 2]\n  arms:\n"
                    "    a: [model=densenet_tiny]\n    b: [model=resnet20]\n"
                    "claims:\n  - {kind: fewer_params, smaller: a, larger: b, margin_pp: 0.5}\n")
    started = []
    monkeypatch.setattr(study.Runner, "run", lambda self, todo: started.append(todo) or 0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = study.main(["run", str(plan), "--tracking-uri", uri])
    err = capsys.readouterr().err
    if rule:
        assert code == 0 and len(started[0]) == 4, err
    else:
        assert code == EXIT_BAD_INPUT and not started and err.count("\n") == 1 and err.startswith("error: settled")
        assert "declared before a confirmation starts" in err and not (tmp_path / "mlflow.db").exists()


TOOLS = ("report", "export", "replay", "search", "study")


@pytest.mark.parametrize("tool", [*TOOLS, "bench"])
def test_a_bad_flag_is_one_line_naming_the_tool_in_every_tool(tool, capsys):
    """Issue 31: one error boundary (checks.ArgumentParser): no usage block, one line, exit 2."""
    import importlib

    main = importlib.import_module(f"densenet_exp.{tool}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--no-such-flag"] if tool != "export" else ["save", "--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_BAD_INPUT and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith(f"error: python -m densenet_exp.{tool}") and ("--no-such-flag" in err or "required" in err)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_reports_a_one_line_error_raised_anywhere_below_it(tool, monkeypatch, capsys):
    """checks.entry_point wraps each tool's main: a OneLineError from deep inside (here from the
    argument parsing itself) is its line and its exit code, never a traceback."""
    import importlib

    from densenet_exp.checks import OneLineError

    class Refused(OneLineError):
        exit_code = 7

    module = importlib.import_module(f"densenet_exp.{tool}")
    assert hasattr(module.main, "__wrapped__"), f"{tool}.main is not wrapped by checks.entry_point"

    def refuse(*args, **kwargs):
        raise Refused("deep down: no")

    monkeypatch.setattr(module.ArgumentParser, "parse_args", refuse)
    assert module.main([]) == 7
    assert capsys.readouterr().err == "error: deep down: no\n"


def test_a_plan_arm_that_does_not_compose_is_one_line(tmp_path, monkeypatch, capsys):
    """study.job_stores raises InvalidValue for an arm whose overrides do not compose: one line
    naming the arm, before any run (the tool's error boundary prints it)."""
    from densenet_exp import study

    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: p\nrecipe: [experiment=smoke]\nconfirmation:\n  seeds: [1]\n  arms:\n"
                    "    a: [model=no_such_model]\n")
    code = study.main(["run", str(plan), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert err.startswith("error: confirmation.arms.a=['model=no_such_model'] (after the recipe) does not compose")
