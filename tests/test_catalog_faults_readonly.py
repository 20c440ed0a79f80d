"""A home nobody may write (archived on a read-only file system, or another user's) can still
be read: `megapairs lineage` answers, `megapairs status` reports from the catalog and says in
one line that Dagster's instance could not be opened; writing is a clear configuration error."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

import megapairs_assets.lineage.catalog as catalog_module
from megapairs_assets.cli.instance import prepare_dagster_home
from megapairs_assets.lineage.catalog import (
    CatalogConfigError,
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME

# Both commands in one interpreter (one start-up), each exit code printed.
READER = """
import sys
from megapairs_assets.cli.main import main
commands = (["lineage", "image_corpus[00000]"], ["status"], ["lineage", "--snapshot", sys.argv[1]])
for argv in commands:
    code = main(argv)
    print(f"exit {argv[0]} {code}", flush=True)
"""


def _record(partition: str) -> MaterializationRecord:
    return MaterializationRecord(
        asset="image_corpus",
        partition=partition,
        run_id="run-1",
        code_version="v1",
        profile="demo",
        started_at=utc_now(),
        duration_s=0.1,
        materialization_id=new_materialization_id(),
        row_counts={"images": 64},
    )


def _home(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with one materialized shard, registered in its Dagster instance."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = root / "home"
    home.mkdir()
    LineageCatalog(home / "catalog.duckdb").record(_record("00000"))
    prepare_dagster_home(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000"])
    return home


def _read(home: Path, command: list[str], snapshot: Path) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MEGAPAIRS_", "DAGSTER_"))
    }
    env.update(MEGAPAIRS_HOME=str(home), MEGAPAIRS_PROFILE="demo")
    return subprocess.run(
        [*command, sys.executable, "-c", READER, str(snapshot)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_read(result: subprocess.CompletedProcess[str], home: Path, snapshot: Path) -> str:
    out = result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert "exit lineage 0" in out and "exit status 0" in out, (out, result.stderr)
    assert "image_corpus[00000]" in out  # the partition's lineage report
    assert out.count("exit lineage 0") == 2 and snapshot.exists()  # a copy, taken read-only
    assert not (home / "catalog.duckdb.wal").exists()
    return out


def _can_mount_privately() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "none", "/mnt"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_privately(), reason="needs a private read-only bind mount")
def test_a_home_on_a_read_only_file_system_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home(tmp_path, monkeypatch)
    snapshot = tmp_path / "copy" / "catalog.duckdb"
    # A private mount namespace: the read-only mount ends with the command.
    mount = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{home}" "{home}" && exec "$@"']
    out = _assert_read(_read(home, [*mount, "sh"], snapshot), home, snapshot)
    # Dagster's SQLite storage cannot be opened on a read-only file system: said in one line.
    assert "could not be opened" in out and "lineage catalog alone" in out
    assert "every expected partition is complete" not in out


@pytest.mark.skipif(os.geteuid() == 0, reason="file permissions do not bind root")
def test_a_home_this_user_may_not_write_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home(tmp_path, monkeypatch)
    snapshot = tmp_path / "copy" / "catalog.duckdb"
    paths = [home, *home.rglob("*")]
    for path in paths:
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        # Whether SQLite opens Dagster's storage read-only here or not, status answers.
        _assert_read(_read(home, [], snapshot), home, snapshot)
    finally:
        for path in paths:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)


def test_reading_works_and_writing_is_refused_without_a_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "catalog.duckdb"
    LineageCatalog(path).record(_record("00000"))
    (tmp_path / "catalog.duckdb.lock").unlink()
    real_open = open

    def read_only_folder(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if str(file).endswith(".lock") and mode != "r":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    # The fault: a file system that refuses every new file and every write.
    monkeypatch.setattr(catalog_module, "open", read_only_folder, raising=False)
    monkeypatch.setattr(LineageCatalog, "writable", lambda self: False)
    catalog = LineageCatalog(path)
    assert catalog.query("SELECT count(*) AS n FROM materializations")["n"][0] == 1
    assert catalog.read_versions("image_corpus", ["00000"])
    with pytest.raises(CatalogConfigError, match=r"cannot be written here.*MEGAPAIRS_HOME"):
        catalog.record(_record("00001"))
