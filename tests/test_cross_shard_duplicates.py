"""The same image bytes in two shards: both kept, and a warning check names the pair."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import image_factory as factory
from conftest import make_home, run_shards

from megapairs_assets.definitions import build_definitions
from resources.corpus import CorpusSourceResource


def test_copy_in_another_shard_is_kept_and_reported(tmp_path: Path, demo_models_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    shared = factory.good_jpeg_bytes(5)
    factory.write_wds_shard(
        corpus / "00000.tar", [("a", shared, "x"), ("b", factory.good_jpeg_bytes(6), "y")]
    )
    factory.write_wds_shard(corpus / "00001.tar", [("c", shared, "x again")])
    defs = build_definitions(
        "demo",
        make_home(tmp_path, demo_models_dir),
        {"corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus))},
    )
    instance = dg.DagsterInstance.ephemeral()
    # One shard after the other, as separate runs: the second sees the first in the catalog.
    assert run_shards(defs, instance, ["00000"], job_name="corpus_only").success
    second = run_shards(defs, instance, ["00001"], job_name="corpus_only")
    assert second.success  # a warning, not a blocking failure
    evaluation = next(
        e
        for e in second.get_asset_check_evaluations()
        if e.check_name == "corpus_content_unique_across_shards"
    )
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert "00001/c = 00000/a" in evaluation.metadata["examples"].value
