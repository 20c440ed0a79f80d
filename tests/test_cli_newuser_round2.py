"""A new user's second round with the `megapairs` command, driven in process through `main`:

- `lineage --sql` takes one read statement and reads the catalog only (no files, no second
  statement, no SET), on the embedded DuckDB file and on DuckLake (whose data files stay
  readable);
- `ui` refuses a port in use and a Dagster instance another `megapairs ui` serves, before
  starting anything (os.execv is replaced: nothing is started);
- a MEGAPAIRS_HOME or MEGAPAIRS_DATA_ROOT that is a file is a configuration error;
- `--profile` before the subcommand;
- singular wording for one thing; a long search text is echoed shortened.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

from megapairs_assets.cli.main import build_parser, main
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lib.words import is_or_are, plural
from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    ReadOnlyQueryError,
    load_ducklake_extensions,
    new_materialization_id,
    utc_now,
)


def _record(catalog: LineageCatalog, partition: str) -> None:
    catalog.record(
        MaterializationRecord(
            asset="image_corpus",
            partition=partition,
            run_id="r",
            code_version="v1",
            profile="test",
            started_at=utc_now(),
            duration_s=0.1,
            materialization_id=new_materialization_id(),
        )
    )


def _count(catalog: LineageCatalog) -> int:
    return catalog.query("SELECT count(*) AS n FROM materializations")["n"][0]


# --- 1. lineage --sql reads the catalog and nothing else ---------------------------------


@pytest.fixture
def catalog_home(home: Path) -> Path:
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    _record(catalog, "00000")
    return home


def test_sql_refuses_writes_files_and_second_statements(
    catalog_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = LineageCatalog(DataLayout(catalog_home).catalog_path)
    copy = tmp_path / "out.csv"
    refused = {
        f"COPY materializations TO '{copy}'": "COPY",
        "SELECT 1; DELETE FROM materializations": "SELECT, DELETE",
        "DELETE FROM materializations": "DELETE",
        "SET enable_external_access = true": "SET",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other": "ATTACH",
        "": "none",
    }
    for sql, kinds in refused.items():
        assert main(["lineage", "--sql", sql]) == 2, sql
        err = capsys.readouterr().err
        assert "refused" in err and f"got: {kinds}" in err and "Traceback" not in err
    # One SELECT that reaches past the catalog: DuckDB's own sandbox refuses it.
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    for sql in (
        f"SELECT * FROM read_csv('{secret}')",
        "SELECT * FROM read_text('/etc/hostname')",
        f"SELECT * FROM glob('{tmp_path}/*')",
    ):
        assert main(["lineage", "--sql", sql]) == 2, sql
        captured = capsys.readouterr()
        assert "reads the lineage catalog only" in captured.err or "may read" in captured.err
        assert "hunter2" not in captured.out
    assert not copy.exists() and not (tmp_path / "other.duckdb").exists()
    assert _count(catalog) == 1
    # A syntax error is DuckDB's message, exit 1 (not a refusal).
    assert main(["lineage", "--sql", "SELEC 1"]) == 1
    assert "syntax error" in capsys.readouterr().err.lower()
    # Reading the catalog itself still works, DESCRIBE and a trailing semicolon included.
    sql = "SELECT asset, partition FROM materializations;"
    assert main(["lineage", "--sql", sql, "--json"]) == 0
    assert '"partition": "00000"' in capsys.readouterr().out
    assert main(["lineage", "--sql", "DESCRIBE materializations"]) == 0
    assert main(["lineage", "--schema"]) == 0
    capsys.readouterr()
    # The pipeline writes to the same file afterwards: the sandbox was this query's alone.
    _record(catalog, "00001")
    assert _count(catalog) == 2


def test_ducklake_query_reads_its_data_files_and_nothing_else(tmp_path: Path) -> None:
    url, data = f"ducklake:{tmp_path / 'meta.ducklake'}", tmp_path / "lake"
    # A table big enough to be written as Parquet (not inlined into the metadata).
    writer = duckdb.connect()
    load_ducklake_extensions(writer)
    writer.execute(f"ATTACH '{url}' AS lake (DATA_PATH '{data}/')")
    writer.execute("CREATE TABLE lake.big AS SELECT range AS i FROM range(5000)")
    writer.close()
    assert list(data.rglob("*.parquet")), "the test needs a Parquet data file"
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    catalog = LineageCatalog(url, data_path=str(data))
    assert catalog.read_only_query("SELECT count(*) AS n, sum(i) AS s FROM big").row(0) == (
        5000,
        sum(range(5000)),
    )
    with pytest.raises(duckdb.PermissionException):
        catalog.read_only_query(f"SELECT * FROM read_csv('{secret}')")
    with pytest.raises(ReadOnlyQueryError):
        catalog.read_only_query(f"COPY big TO '{tmp_path / 'out.csv'}'")
    with pytest.raises(ReadOnlyQueryError):
        catalog.read_only_query("SELECT 1; DROP TABLE big")
    assert not (tmp_path / "out.csv").exists()
    assert catalog.read_only_query("SELECT count(*) AS n FROM big")["n"][0] == 5000


# --- 2. megapairs ui: a taken port, an instance already served ---------------------------


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """os.execv replaced by a recorder: the command returns instead of becoming Dagster."""
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(list(argv)))
    return calls


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ui_on_a_port_in_use_is_one_configuration_error(
    home: Path, no_exec: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("megapairs ui: configuration error: ")
    assert f"port {port}" in line and "--port" in line
    assert "Dagster UI on" not in captured.out and no_exec == []


def test_a_second_ui_on_the_same_instance_is_refused(
    home: Path,
    no_exec: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    lock_path = home / "dagster" / ".megapairs-ui.lock"
    seen: list[bool] = []

    def fake_exec(path: str, argv: list[str]) -> None:
        # At the exec the lock is taken and will survive it; another UI cannot get it.
        with open(lock_path) as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except BlockingIOError:
                seen.append(True)
        no_exec.append(argv)

    monkeypatch.setattr(os, "execv", fake_exec)
    first_port = _free_port()
    assert main(["ui", "--port", str(first_port)]) == 0
    assert seen == [True] and len(no_exec) == 1
    assert f"http://127.0.0.1:{first_port}" in capsys.readouterr().out
    assert lock_path.read_text().startswith(f"pid {os.getpid()}, port {first_port}")

    # Another process serving the instance holds the lock (here: this test, by hand).
    with open(lock_path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["ui", "--port", str(_free_port())]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("megapairs ui: configuration error: another `megapairs ui` (pid ")
    assert f"port {first_port}" in line and str(home / "dagster") in line
    assert len(no_exec) == 1  # nothing started the second time


def test_a_daemon_heartbeat_warns_embedded_and_stops_a_cluster_ui(
    home: Path,
    no_exec: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import dagster as dg
    from dagster._daemon.types import DaemonHeartbeat

    from megapairs_assets.cli.instance import prepare_dagster_home
    from megapairs_assets.cli.ui import recent_daemon_heartbeat

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    prepare_dagster_home(home)  # sets DAGSTER_HOME (restored by monkeypatch afterwards)
    monkeypatch.setenv("DAGSTER_HOME", os.environ["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        assert recent_daemon_heartbeat(instance) is None
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time() - 5, "SENSOR", "other", None))
        assert recent_daemon_heartbeat(instance)[0] == "SENSOR"
        assert recent_daemon_heartbeat(instance, now_s=time.time() + 120) is None

    assert main(["ui", "--port", str(_free_port())]) == 0
    captured = capsys.readouterr()
    assert "warning: a Dagster daemon (SENSOR) wrote a heartbeat" in captured.err
    assert len(no_exec) == 1

    monkeypatch.setenv("MEGAPAIRS_DEPLOYMENT", "cluster")
    monkeypatch.setenv("MEGAPAIRS_POSTGRES_URL", "postgresql://unused")
    monkeypatch.setenv("MEGAPAIRS_LINEAGE_CATALOG", "ducklake:postgres:dbname=unused")
    monkeypatch.setenv("MEGAPAIRS_LINEAGE_DATA_PATH", str(home / "lake"))
    # This instance is SQLite: on the cluster deployment that alone is refused first.
    assert main(["ui", "--port", str(_free_port())]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "configuration error: MEGAPAIRS_DEPLOYMENT=cluster" in line and "PostgreSQL" in line
    # Taken as PostgreSQL (the heartbeats are what this test is about): a recent one refuses.
    monkeypatch.setattr("megapairs_assets.cli.instance._uses_postgres", lambda config: True)
    assert main(["ui", "--port", str(_free_port())]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "configuration error: a Dagster daemon (SENSOR)" in line
    assert "already runs a daemon" in line and len(no_exec) == 1


def test_ui_port_must_be_a_port(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ui", "--port", "70000"])
    assert exit_info.value.code == 2 and "1..65535" in capsys.readouterr().err


# --- 3. a home or data root that is a file ------------------------------------------------


@pytest.mark.parametrize("variable", ["MEGAPAIRS_HOME", "MEGAPAIRS_DATA_ROOT"])
@pytest.mark.parametrize("prefix", ["", "file://"])
def test_a_home_or_data_root_that_is_a_file_is_a_configuration_error(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    prefix: str,
) -> None:
    regular = tmp_path / "notes.txt"
    regular.write_text("not a folder")
    monkeypatch.setenv(variable, prefix + str(regular))
    assert main(["status"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("megapairs status: configuration error: ")
    assert variable in line and "not a folder" in line


def test_missing_folders_and_remote_roots_pass_untouched(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resources.environment import check_folder_settings

    missing = tmp_path / "later"
    check_folder_settings({"MEGAPAIRS_HOME": str(missing), "MEGAPAIRS_DATA_ROOT": str(missing)})
    check_folder_settings({"MEGAPAIRS_DATA_ROOT": "s3://bucket/prefix"})  # no network
    assert not missing.exists()  # nothing created


# --- 4. --profile before the subcommand ----------------------------------------------------


def test_profile_before_or_after_the_subcommand(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import megapairs_assets.cli.config as config_cli

    seen: list[str | None] = []
    monkeypatch.setattr(
        config_cli, "cmd_config", lambda args: seen.append(os.environ.get("MEGAPAIRS_PROFILE"))
    )
    assert main(["--profile", "paper", "config"]) == 0
    assert main(["config", "--profile", "paper"]) == 0
    assert main(["--profile", "paper", "config", "--profile", "paper"]) == 0
    assert main(["config"]) == 0
    assert seen == ["paper", "paper", "paper", "demo"]
    assert os.environ["MEGAPAIRS_PROFILE"] == "demo"  # restored after each command
    with pytest.raises(SystemExit) as exit_info:
        main(["--profile", "demo", "config", "--profile", "paper"])
    assert exit_info.value.code == 2
    assert "--profile given twice" in capsys.readouterr().err
    assert "--profile" in build_parser().format_usage()


# --- 5. plurals ----------------------------------------------------------------------------


def test_plural_words() -> None:
    assert plural(1, "shard") == "1 shard" and plural(2, "shard") == "2 shards"
    assert plural(0, "entry") == "0 entries" and plural(1, "entry") == "1 entry"
    assert plural(3, "day") == "3 days" and plural(2, "match") == "2 matches"
    assert plural(2, "index", "indices") == "2 indices"
    assert is_or_are(1) == "is" and is_or_are(4) == "are"


def test_one_warning_and_one_setting_read_in_the_singular() -> None:
    from megapairs_assets.lib.errors import ConfigurationError
    from resources.environment import ProfileError
    from resources.profiles import check_ready

    def bad() -> None:
        raise ConfigurationError("the weights file is empty")

    def fine() -> None:
        return None

    resources = {
        "corpus_source": SimpleNamespace(shard_ids=lambda: ["00000"]),
        "clip_image_encoder": SimpleNamespace(validate=bad),
        "dino_image_encoder": SimpleNamespace(validate=fine),
        "caption_text_encoder": SimpleNamespace(validate=fine),
    }
    with pytest.raises(ProfileError, match=r"^1 setting to fix before"):
        check_ready(resources, ("mine",))


# --- 6. a long search text is echoed shortened ----------------------------------------------


def test_a_long_query_text_is_shortened_in_the_header_and_page_only(tmp_path: Path) -> None:
    from megapairs_assets.cli.search import QUERY_CHARS_SHOWN, shown_results
    from megapairs_assets.retriever.search import (
        QueryResult,
        SearchQuery,
        results_markdown,
        write_html,
    )

    text = "a red car parked by the sea " * 800  # ~22,000 characters
    results = [QueryResult(SearchQuery(text=text), hits=[])]
    header = results_markdown(shown_results(results)).splitlines()[0]
    assert header.startswith("**query 1** · text 'a red car parked by the sea")
    assert len(header) < QUERY_CHARS_SHOWN + 40 and f"{len(text)} characters in all" in header
    page = write_html(tmp_path / "r.html", shown_results(results), {}, "r", "g").read_text()
    assert len(page) < 5000 and f"{len(text)} characters in all" in page
    assert results[0].query.text == text  # the search (and --json) keep the whole text
    short = [QueryResult(SearchQuery(text="in winter"), hits=[])]
    assert shown_results(short)[0].query.text == "in winter"
