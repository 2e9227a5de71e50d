"""The tracking store a run logs to: its URI checked, a new SQLite store created and migrated
once under a file lock, and bounded waits for a tracking server that does not answer.

Two processes that open a new SQLite store at once would both run MLflow's migrations and can
leave it broken for good (`table _alembic_tmp_latest_metrics already exists`), so the first
process creates it while holding `<store>.lock` and the others wait for it. It creates and
migrates the store in `<store>.creating` and moves it into place once complete, so a kill during
the migrations leaves no half-made store behind (and a half-made one left by older code, that no
run has written to, is set aside and made anew). Readers (the report, export, replay) never
create a store: `check_store` turns a missing or unusable one into one line.

A process killed inside a write leaves SQLite's hot journal (`mlflow.db-journal`) beside the
store. Only a read-write connection rolls it back, so both checks open the file read-write,
under the same lock (`heal`); SQLite's own locks keep a live writer's journal from being taken
for a hot one. A store is never to be moved apart from its journal: that corrupts it.

Kept free of Lightning and Hydra so that the report and the notebooks, which only read the
store, start in seconds (`densenet_exp.runs.tracking` builds on this for training runs).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import sys
import time
from datetime import datetime
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..checks import EXIT_STORE_DOWN, InvalidValue, OneLineError, require
from ..config import CONFIG_FILE

T = TypeVar("T")

# Schemes MLflow's tracking client understands (SQLAlchemy's may carry a driver: postgresql+psycopg2).
SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
# `tracking.http` key -> MLflow's client setting (read on every request).
HTTP_SETTINGS = {
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}
CREATE_LOCK_WAIT_S = 300
HEAL_WAIT_S = 60  # how long a check waits for a live writer's transaction to end
# Tables every MLflow store has (MLflow's own test of a complete store), and the prefix of the
# copies its migrations make while they alter a table.
MLFLOW_TABLES = ("alembic_version", "experiments", "runs", "tags", "params", "metrics")
MIGRATION_TABLE_PREFIX = "_alembic_tmp_"
SIDE_FILES = ("-journal", "-wal", "-shm")  # SQLite's files beside a database, named after it
_down: set[str] = set()  # servers found unreachable in this process: no call waits on them again


class StoreConfigError(OneLineError, ValueError):
    """A store URI or file that cannot work; one line naming it and what to do."""


class StoreUnreachable(OneLineError, RuntimeError):
    """The tracking server did not answer within `tracking.http`'s retries."""

    exit_code = EXIT_STORE_DOWN

    def __init__(self, uri: str, unsent: Path | None = None) -> None:
        self.uri, self.unsent = uri, unsent
        _down.add(uri)
        super().__init__(f"the tracking server at {uri} is unreachable")

    def advice(self) -> str:
        """One line: what happened and how to get the figures in."""
        if self.unsent is not None and self.unsent.is_file():
            rows = sum(1 for _ in self.unsent.open())
            return (f"the tracking server at {self.uri} is unreachable (gave up after the retries of tracking.http); "
                    f"{rows} unsent record(s) are kept in {self.unsent}: once it is back, run "
                    f"`python -m densenet_exp.replay {self.unsent}`, then the same command again to resume")
        return (f"the tracking server at {self.uri} is unreachable (gave up after the retries of tracking.http): "
                "start it or point tracking.uri elsewhere; nothing was trained")


def tracking_uri(configured: str | None, root: Path) -> str:
    """The store a run logs to: the config's `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else
    the SQLite file `mlflow.db` in the project root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def tool_uri(flag: str | None, name: str = "--tracking-uri") -> tuple[str, str]:
    """The store a command-line tool reads, and how to name where it came from in a message:
    its flag, else $MLFLOW_TRACKING_URI, else `mlflow.db` in the current folder."""
    key = name if flag else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else f"{name} (default)"
    return tracking_uri(flag, Path.cwd()), key


def is_down(uri: str | None) -> bool:
    """Whether this process already found the server at `uri` unreachable."""
    return uri in _down


def retry_locked(fn: Callable[[], T], attempts: int = 8) -> T:
    """Call `fn`, retrying while SQLite says the database is locked (parallel jobs, one file)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            if "locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")


def unreachable(err: BaseException | None) -> bool:
    """Whether `err` (or what it was raised from) says the server could not be reached."""
    import requests

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, StoreUnreachable | requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        text = str(err)
        if "Max retries exceeded" in text or "Connection refused" in text:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def bound_http_waits(http: Mapping[str, Any] | None) -> None:
    """Apply `tracking.http` to MLflow's client (environment settings, inherited by DDP ranks)."""
    for key, value in (http or {}).items():
        if key not in HTTP_SETTINGS:
            raise StoreConfigError(f"tracking.http.{key}={value!r} is not a setting: expected one of "
                                   f"{', '.join(HTTP_SETTINGS)}")
        if value is not None:
            os.environ[HTTP_SETTINGS[key]] = str(value)


def bound_tool_waits(config: Path = CONFIG_FILE) -> None:
    """For the command-line tools (replay, report, export), which have no Hydra config: the
    `tracking.http` bounds of the run config (`conf/config.yaml`), where the environment does
    not set MLflow's own settings, so that they give up on a server that is down as a run does."""
    import yaml

    try:
        http = (yaml.safe_load(config.read_text()).get("tracking") or {}).get("http") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return  # an installed copy without the config folder: MLflow's own settings
    for key, value in http.items():
        if key in HTTP_SETTINGS and value is not None:
            os.environ.setdefault(HTTP_SETTINGS[key], str(value))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for an in-memory database)."""
    path = uri.split("://", 1)[1].removeprefix("/")
    return None if path in ("", ":memory:") else Path(path).expanduser()


def check_uri(uri: str, key: str) -> None:
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    try:
        require(key, uri, scheme in SCHEMES, "sqlite:///PATH, http(s)://HOST:PORT of an MLflow server, "
                "or a database URI (postgresql://, mysql://, mssql://)")
    except InvalidValue as err:
        raise StoreConfigError(str(err)) from None


def prepare_store(uri: str, key: str = "tracking.uri") -> None:
    """Check the URI; for SQLite, create and migrate the store once, under a file lock, before
    any client uses it, and turn every way the file can be unusable into one line; for a server,
    check that it answers as MLflow (StoreUnreachable when it does not answer at all)."""
    check_uri(uri, key)
    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if path is None:
        _probe(uri, key)
        return
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        why = f"{blocker} is not a folder" if not blocker.is_dir() else err.strerror
        raise StoreConfigError(f"{key}={uri!r}: cannot create the folder {folder} ({why}): "
                               "point it at a writable folder") from None
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StoreConfigError(f"{key}={uri!r}: {path} is not writable: point it at a writable folder")
    with _exclusive(lock_file(path)):
        if not path.exists() or path.stat().st_size == 0:
            _create(path, uri, key)
        try:
            _check_sqlite_file(path, uri, key)
            _probe(uri, key)
        except StoreConfigError:
            if not _unwritten(path):
                raise
            _forget(uri)
            moved = path.with_name(f"{path.name}.half-made-{datetime.now():%Y%m%d-%H%M%S}")
            for suffix in ("", *SIDE_FILES):
                if Path(f"{path}{suffix}").exists():
                    os.replace(f"{path}{suffix}", f"{moved}{suffix}")
            print(f"warning: {path} is a half-made MLflow store that no run has written to: set aside as {moved.name}, "
                  "and a new one is made", file=sys.stderr, flush=True)
            _create(path, uri, key)
            _probe(uri, key)


def check_store(uri: str, key: str = "--tracking-uri") -> None:
    """For tools that only read or add to an existing store (report, export, replay): the URI,
    and a store that exists, is complete and answers; never creates one. One line
    (StoreConfigError) for each way it can fail, StoreUnreachable for a server that is down."""
    check_uri(uri, key)
    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if path is not None:
        if not path.is_file() or path.stat().st_size == 0:
            raise StoreConfigError(f"{key}={uri!r}: there is no MLflow store at {path} (a training run creates one; "
                                   "this command only reads or adds to one)")
        # The store's lock where the harness made it or a hot journal needs it: a reader adds no
        # file beside a store it only reads (SQLite's own locks already keep a live writer safe).
        locked = lock_file(path).exists() or Path(f"{path}-journal").exists()
        if locked and os.access(path.parent, os.W_OK) and os.access(path, os.W_OK):
            with _exclusive(lock_file(path)):
                _check_sqlite_file(path, uri, key, complete=True)
        else:
            _check_sqlite_file(path, uri, key, complete=True)
    _probe(uri, key)


def _probe(uri: str, key: str) -> None:
    """One call that opens the store (MLflow creates or checks its tables; the store is cached
    per URI, so the harness's later clients reuse it) and shows that a server speaks MLflow."""
    from mlflow.tracking import MlflowClient

    try:
        retry_locked(lambda: MlflowClient(uri).search_experiments(max_results=1))
    except Exception as err:
        if unreachable(err):
            raise StoreUnreachable(uri) from None
        path = sqlite_path(uri) if uri.startswith("sqlite:") else None
        if path is not None:
            raise StoreConfigError(_unusable(uri, key, path, err)) from None
        why = str(err).split(". Response body", 1)[0].strip().splitlines()
        raise StoreConfigError(f"{key}={uri!r} does not answer as an MLflow tracking server "
                               f"({(why[0] if why else type(err).__name__)[:300]}): point it at an MLflow server "
                               "(`mlflow server`, `make server`)") from None


def _create(path: Path, uri: str, key: str) -> None:
    """Make a new store at `path`: created and migrated as `<name>.creating` (a leftover of a
    kill is removed first), then moved into place in one step."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    draft = path.with_name(f"{path.name}.creating")
    # A kill's leftovers: the draft, and journals of the draft or of an empty file at `path`
    # (SQLite would replay a stale journal into the new store).
    for leftover in (draft, *(Path(f"{f}{suffix}") for f in (draft, path) for suffix in SIDE_FILES)):
        leftover.unlink(missing_ok=True)
    draft_uri = f"sqlite:///{draft}"
    try:
        SqlAlchemyStore(draft_uri, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)  # creates the tables, then checks them
    except Exception as err:  # a full disk, a read-only folder after all: one line, and no draft left
        _forget(draft_uri)
        for leftover in (draft, *(Path(f"{draft}{suffix}") for suffix in SIDE_FILES)):
            leftover.unlink(missing_ok=True)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StoreConfigError(f"{key}={uri!r}: no MLflow store could be made at {path} ({first}): point it at "
                               "a writable folder with room") from None
    finally:
        _forget(draft_uri)  # no connection may outlive the file's name
    os.replace(draft, path)


def _forget(uri: str) -> None:
    """Close and drop MLflow's cached database engine of `uri` (its file moved or went away)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("select name from sqlite_master where type = 'table'")}


def _unwritten(path: Path) -> bool:
    """Whether `path` is a store that MLflow began to make (its migration tables are there) and
    no one has used: no run, no experiment but MLflow's Default."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = _tables(conn)
            if "alembic_version" not in tables and not any(t.startswith(MIGRATION_TABLE_PREFIX) for t in tables):
                return False
            runs = conn.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
            named = (conn.execute("select count(*) from experiments where experiment_id != 0").fetchone()[0]
                     if "experiments" in tables else 0)
    except sqlite3.Error:
        return False
    return runs == 0 and named == 0


def lock_file(path: Path) -> Path:
    """The lock held while a store is created or checked (and its hot journal rolled back)."""
    return path.with_name(f"{path.name}.lock")


def _check_sqlite_file(path: Path, uri: str, key: str, complete: bool = False) -> None:
    """Garbage, a truncated copy or another program's database: say so before MLflow tries it.
    Opened read-write where this process may write, so that the first read rolls back a hot
    journal that a killed writer left (a read-only connection cannot, and fails); the caller
    holds lock_file(path). `complete`: MLflow's tables must all be there (a reader must not
    make MLflow migrate)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    mode = "rw" if os.access(path, os.W_OK) else "ro"
    try:
        # The timeout waits out a live writer's transaction (MLflow's are short).
        with sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=HEAL_WAIT_S) as conn:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            tables = _tables(conn)
        conn.close()  # the context manager only commits
    except sqlite3.Error as err:
        raise StoreConfigError(_unusable(uri, key, path, err)) from None
    if check != "ok":
        raise StoreConfigError(_unusable(uri, key, path, check))
    if tables and "experiments" not in tables:
        raise StoreConfigError(_unusable(uri, key, path, "an SQLite database without MLflow's tables"))
    missing = [t for t in MLFLOW_TABLES if t not in tables]
    if complete and missing:
        raise StoreConfigError(_unusable(uri, key, path, f"a half-made store: no table {', '.join(missing)}"))


def _unusable(uri: str, key: str, path: Path, why: object) -> str:
    first = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
    beside = [Path(f"{path}{suffix}").name for suffix in SIDE_FILES if Path(f"{path}{suffix}").exists()]
    if beside:  # moving the store apart from its journal is how SQLite files get corrupted
        return (f"{key}={uri!r}: {path} is not a usable MLflow store ({first[:300]}); never move it apart from "
                f"{' and '.join(beside)}: run this command once as a user who can write {path.parent} (that rolls "
                f"an interrupted write back), or point {key} at another file")
    return (f"{key}={uri!r}: {path} is not a usable MLflow store ({first[:300]}): move it aside, "
            f"or point {key} at another file")


class _exclusive:
    """A blocking flock on `path` (created if missing), waited for at most CREATE_LOCK_WAIT_S."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _exclusive:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + CREATE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise StoreConfigError(f"{self.path} stayed locked for {CREATE_LOCK_WAIT_S} s by another "
                                           "process creating or checking the store: is one stuck?") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
