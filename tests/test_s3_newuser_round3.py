"""A new user's third round with the data root on S3 (moto in server mode on 127.0.0.1):

- the demo summary prints what the catalog knows and one line when the data root cannot be
  read (the server went away), never a traceback;
- `check --existing` with the store down is one line and exit 3 (no check ran), not exit 1;
- `check --existing` on an emptied bucket whose catalog records complete partitions fails
  `table_present` (exit 1), not a configuration error;
- the summary's `score it` / `use it` commands name files on this machine, and `search`
  refuses an S3 URL for --image / --retriever with one line naming what to pass;
- `lineage --snapshot` on a DuckLake catalog says how to open it offline;
- a table missing because the data root moved says where it was recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from megapairs_assets.cli.main import main
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

BUCKET = "round3"
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A moto server with an empty bucket; `stop()` kills it mid-test (the store goes away)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for name, value in _FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    stopped = []

    def stop() -> None:
        server.stop()
        stopped.append(True)

    yield SimpleNamespace(endpoint_url=endpoint_url, client=client, stop=stop)
    if not stopped:
        server.stop()


@pytest.fixture
def s3_home(tmp_path: Path, s3: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home whose data root is `s3://BUCKET/prefix`, set as a user sets it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.setenv("MEGAPAIRS_DATA_ROOT", f"s3://{BUCKET}/prefix")
    monkeypatch.setenv("MEGAPAIRS_STORAGE_ENDPOINT_URL", s3.endpoint_url)
    # Unreachable: botocore would otherwise retry a refused connection for a long time.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    return home


def _record_complete(catalog: LineageCatalog, asset: str, partition: str, path: str) -> None:
    catalog.record(
        MaterializationRecord(
            asset=asset,
            partition=partition,
            run_id="r",
            code_version="v",
            profile="demo",
            started_at=datetime(2026, 1, 1),
            duration_s=1.0,
            row_counts={"images": 1},
            output_paths={"images": path},
        )
    )


# -- 2: check --existing with the store down ---------------------------------------------------


def test_check_existing_with_the_store_down_is_one_line_and_exit_3(
    s3_home: Path, s3: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = LineageCatalog(s3_home / "catalog.duckdb")
    _record_complete(catalog, "image_corpus", "00000", f"s3://{BUCKET}/prefix/data/x.parquet")
    s3.stop()
    code = main(["check", "--existing"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Traceback" not in err
    assert "the data root could not be read" in err and "no check ran" in err


# -- 3: check --existing on an emptied bucket --------------------------------------------------


def test_check_existing_on_an_emptied_bucket_fails_table_present(
    s3_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = LineageCatalog(s3_home / "catalog.duckdb")
    path = f"s3://{BUCKET}/prefix/data/image_corpus/00000/images.parquet"
    _record_complete(catalog, "image_corpus", "00000", path)
    code = main(["check", "--existing"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "configuration error" not in captured.err
    assert "table_present" in captured.out and "Traceback" not in captured.err


# -- 1 and 4: the demo summary -----------------------------------------------------------------


def _summary_resources(home: Path, s3: SimpleNamespace) -> dict:
    from resources.storage import StorageResource

    catalog = LineageCatalog(home / "catalog.duckdb")
    storage = StorageResource(
        home=str(home), data_root=f"s3://{BUCKET}/prefix", endpoint_url=s3.endpoint_url
    )
    return {
        "storage": storage,
        "catalog": SimpleNamespace(catalog=lambda: catalog),
        "evaluation": SimpleNamespace(base_spec=lambda: SimpleNamespace(retriever_id="base")),
    }


def test_summary_with_the_store_down_prints_one_line_not_a_traceback(
    s3_home: Path, s3: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    from megapairs_assets.cli.summary import print_summary

    resources = _summary_resources(s3_home, s3)
    s3.stop()
    print_summary(resources, ["00000"], 1.0, [])  # raised before: p.exists() on a dead store
    out = capsys.readouterr().out
    assert "images:      0 valid across 1 shard" in out  # the catalog's part still prints
    (line,) = [line for line in out.splitlines() if "data root:" in line]
    assert "could not be read" in line and "\n" not in line
    assert "outputs:" in out and "mined pairs" not in out


def test_summary_commands_name_local_files_for_an_s3_data_root(
    s3_home: Path, s3: SimpleNamespace
) -> None:
    import shlex

    from megapairs_assets.cli.main import build_parser
    from megapairs_assets.cli.summary import local_query, training_lines
    from megapairs_assets.evaluation.step import local_checkpoint_root

    resources = _summary_resources(s3_home, s3)
    layout = resources["storage"].layout()
    catalog: LineageCatalog = resources["catalog"].catalog()
    export = f"s3://{BUCKET}/prefix/data/mmret_clip_checkpoint/demo/open_clip"
    catalog.record(
        MaterializationRecord(
            asset="mmret_clip_checkpoint",
            partition="demo",
            run_id="r",
            code_version="v",
            profile="demo",
            started_at=datetime(2026, 1, 1),
            duration_s=1.5,
            output_paths={"open_clip_dir": export},
        )
    )
    remote_image = f"s3://{BUCKET}/prefix/data/triplet_export/images/00000/k1.jpg"
    local = local_checkpoint_root(layout) / "demo" / "open_clip"
    lines = training_lines(catalog, (remote_image, "make it red"), layout)
    (score,) = [line for line in lines if "score it:" in line]
    argv = shlex.split(score.split("score it:", 1)[1])
    assert build_parser().parse_args(argv[1:]).retriever == str(local)
    (use,) = [line for line in lines if "use it:" in line]
    assert "s3://" not in use.split("(")[0] and "--image" not in use
    assert any(remote_image in line for line in lines)  # says where the query image is
    assert local_query(None, catalog) is None


def test_search_refuses_s3_urls_with_what_to_pass_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path))
    url = f"s3://{BUCKET}/prefix/data/mmret_clip_checkpoint/demo/open_clip"
    assert main(["search", "--retriever", url, "--text", "red"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    local = tmp_path / "cache" / "mmret_clip_checkpoint" / "demo" / "open_clip"
    assert f"--retriever {local}" in line
    image = f"s3://{BUCKET}/prefix/data/triplet_export/images/00000/k1.jpg"
    assert main(["search", "--retriever", "base", "--image", image]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--image {image} is a URL" in line and "s3:/round3" not in line


# -- 6: a data root set one level too deep -----------------------------------------------------


def test_a_moved_data_root_is_named_instead_of_a_rematerialization(tmp_path: Path) -> None:
    from megapairs_assets.lineage.catalog import MissingTableError, read_with_versions

    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    recorded = tmp_path / "home" / "data" / "clip_image_knn" / "00002.parquet"
    recorded.parent.mkdir(parents=True)
    recorded.write_bytes(b"PAR1")  # still there: only the data root setting changed
    _record_complete(catalog, "clip_image_knn", "00002", str(recorded))
    too_deep = tmp_path / "home" / "data" / "data" / "clip_image_knn" / "00002.parquet"

    def read() -> None:
        raise FileNotFoundError(2, "No such file or directory", str(too_deep))

    with pytest.raises(MissingTableError) as raised:
        read_with_versions(catalog, "clip_image_knn", ["00002"], read)
    message = str(raised.value)
    assert f"recorded at {recorded}" in message
    # The user set the data root to the printed `outputs:` folder (home/data); it was home.
    home = tmp_path / "home"
    assert f"the data root is now {home / 'data'} (it was {home} then)" in message
    assert "Re-materialize" not in message


# -- 5: lineage --snapshot on DuckLake ---------------------------------------------------------


def test_snapshot_of_a_ducklake_catalog_says_how_to_read_it_offline(tmp_path: Path) -> None:
    pytest.importorskip("duckdb_extension_ducklake")
    from megapairs_assets.lineage.catalog import CatalogConfigError

    catalog = LineageCatalog(
        f"ducklake:{tmp_path / 'lake.ducklake'}", data_path=str(tmp_path / "lake")
    )
    with pytest.raises(CatalogConfigError) as raised:
        catalog.snapshot(tmp_path / "copy.duckdb")
    message = str(raised.value)
    assert "megapairs lineage --sql" in message
    assert "LOAD '" in message and "ducklake.duckdb_extension" in message


def test_eval_refuses_a_retriever_url_naming_its_local_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    url = "s3://bucket/prefix/data/mmret_clip_checkpoint/demo/open_clip"
    assert main(["eval", "--retriever", url, "--benchmark", "heldout"]) == 2
    err = capsys.readouterr().err
    assert "configuration error:" in err and "cache/mmret_clip_checkpoint/demo/open_clip" in err
