"""New-user round 2 on scoring: retriever ids of checkpoint paths, the comparison plot's order
and legend, and `megapairs status` counting unscored benchmark_scores partitions as missing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch

from megapairs_assets.cli.main import main
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.assets import RETRIEVER_PARTITIONS_NAME, score_partition_key
from megapairs_assets.evaluation.run import BENCHMARK_FAMILY, BENCHMARK_KEYS
from megapairs_assets.lib.storage import is_safe_partition_key
from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)
from megapairs_assets.retriever.discovery import discover_checkpoints
from megapairs_assets.retriever.model import spec_from_argument


def _training_output(root: Path, config: str) -> Path:
    """What training writes for one config: an open_clip export (config naming the model,
    weights, the weights' sidecar) and Lightning's last.ckpt. Ids need no real weights."""
    folder = root / config
    export = folder / "open_clip"
    export.mkdir(parents=True)
    names_model = json.dumps({"model_name": DEMO_CLIP_MODEL})
    (export / "open_clip_config.json").write_text(names_model)
    (export / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (export / "open_clip_pytorch_model.json").write_text(names_model)
    (folder / "lightning").mkdir()
    lightning = {
        "pytorch-lightning_version": "2.5.0",
        "hyper_parameters": {"model_name": DEMO_CLIP_MODEL},
        "state_dict": {},
    }
    torch.save(lightning, folder / "lightning" / "last.ckpt")
    return folder


def test_every_form_of_a_training_checkpoint_has_its_config_id_and_configs_differ(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data" / "mmret_clip_checkpoint"
    ids = {}
    for config in ("demo", "demo-lr1e3"):
        folder = _training_output(root, config)
        forms = [
            folder,
            folder / "open_clip",
            folder / "open_clip" / "open_clip_pytorch_model.bin",
            folder / "lightning" / "last.ckpt",
        ]
        seen = {spec_from_argument(str(form)).retriever_id for form in forms}
        assert seen == {f"{DEMO_CLIP_MODEL}__{config}.open_clip"}, config
        ids[config] = seen.pop()
        assert is_safe_partition_key(ids[config])
    assert ids["demo"] != ids["demo-lr1e3"]
    # The sensor's discovery names the exports the same way as the CLI's forms.
    assert sorted(discover_checkpoints(root)) == sorted(ids.values())


def test_generic_file_names_also_name_the_folder_above(tmp_path: Path) -> None:
    paths = [
        tmp_path / "run-a" / "checkpoints" / "epoch-3.pt",
        tmp_path / "run-b" / "checkpoints" / "epoch-3.pt",
        tmp_path / "exp-1" / "final" / "model.pt",
        tmp_path / "exp-2" / "final" / "model.pt",
        tmp_path / "x" / "run-a" / "last.ckpt",  # not Lightning's layout: a plain state dict
        tmp_path / "x" / "run-b" / "last.ckpt",
    ]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
    ids = [spec_from_argument(str(p), default_model="ViT-B-32").retriever_id for p in paths]
    assert len(set(ids)) == len(paths), ids
    assert ids[0] == "ViT-B-32__run-a.checkpoints.epoch-3"
    assert ids[2] == "ViT-B-32__exp-1.final.model"
    # A telling file name in a telling folder keeps its short id.
    named = tmp_path / "demo" / "step-000010.pt"
    named.parent.mkdir()
    named.write_bytes(b"weights")
    assert spec_from_argument(str(named), default_model="ViT-B-32").retriever_id == (
        "ViT-B-32__demo.step-000010"
    )


def test_comparison_plot_orders_metrics_by_family_then_k_and_keeps_the_legend_off_the_bars() -> (
    None
):
    pytest.importorskip("matplotlib")
    from megapairs_assets.evaluation.plot import comparison_figure

    metrics = ["mAP@10", "mAP@25", "mAP@5", "mAP@50", "Recall@10", "Recall@1"]
    scores = pl.DataFrame(
        {
            "retriever_id": ["base"] * len(metrics) + ["megapairs-tiny-clip__demo.open_clip"] * 6,
            "split": ["val"] * 2 * len(metrics),
            "metric": metrics * 2,
            "value": [90.0, 95.0, 99.0, 100.0, 80.0, 70.0] * 2,
        }
    )
    figure = comparison_figure(scores, "circo-val")
    try:
        figure.canvas.draw()
        (axes,) = figure.axes
        ticks = [label.get_text() for label in axes.get_xticklabels()]
        assert ticks == ["Recall@1", "Recall@10", "mAP@5", "mAP@10", "mAP@25", "mAP@50"]
        renderer = figure.canvas.get_renderer()
        legend = axes.get_legend().get_window_extent(renderer)
        plot_area = axes.get_window_extent(renderer)
        # Outside the axes (to their right): no bar can be under it.
        assert legend.x0 >= plot_area.x1
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def test_text_bars_use_the_same_metric_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from megapairs_assets.evaluation.plot import comparison_markdown

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    metrics = ["mAP@10", "mAP@5", "mAP@50"]
    scores = pl.DataFrame(
        {"retriever_id": ["base"] * 3, "split": ["val"] * 3, "metric": metrics, "value": [1.0] * 3}
    )
    text = comparison_markdown(scores, "circo-val")
    assert text.index("mAP@5\n") < text.index("mAP@10\n") < text.index("mAP@50\n")


def _scored(catalog: LineageCatalog, partition: str) -> None:
    time.sleep(0.001)  # distinct started_at
    catalog.record(
        MaterializationRecord(
            asset="benchmark_scores",
            partition=partition,
            run_id="r",
            code_version="v1",
            profile="test",
            started_at=utc_now(),
            duration_s=0.1,
            materialization_id=new_materialization_id(),
            input_versions={},
        )
    )


def test_status_counts_registered_unscored_benchmark_partitions_as_missing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home.mkdir(parents=True)
    # Scores are expected on the benchmarks this home can score: held-out, and those whose
    # folders are set (here CIRCO and CIRR, not FashionIQ or GeneCIS).
    for family in ("CIRCO", "CIRR"):
        (tmp_path / family).mkdir()
        monkeypatch.setenv(f"MEGAPAIRS_{family}_ROOT", str(tmp_path / family))
    monkeypatch.delenv("MEGAPAIRS_FASHIONIQ_ROOT", raising=False)
    monkeypatch.delenv("MEGAPAIRS_GENECIS_ROOT", raising=False)
    scorable = [k for k in BENCHMARK_KEYS if BENCHMARK_FAMILY[k] in ("heldout", "circo", "cirr")]
    catalog = LineageCatalog(home / "catalog.duckdb")
    retrievers = ["base-clip__openai", "tiny__demo.open_clip", "tiny__demo-lr1e3.open_clip"]
    scored = [score_partition_key(r, "heldout") for r in retrievers]
    scored += [score_partition_key(r, "circo-val") for r in retrievers]
    for partition in scored:
        _scored(catalog, str(partition))
    from megapairs_assets.cli.instance import prepare_dagster_home

    prepare_dagster_home(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(RETRIEVER_PARTITIONS_NAME, retrievers)
    assert main(["status", "--json"]) == 0
    report = {row["asset"]: row for row in json.loads(capsys.readouterr().out)}
    scores = report["benchmark_scores"]
    expected = len(retrievers) * len(scorable)
    assert len(scorable) < len(BENCHMARK_KEYS)
    assert (scores["expected"], scores["complete"]) == (expected, len(scored))
    assert scores["missing"] == expected - len(scored) and not scores["healthy"]
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    unscored = score_partition_key("tiny__demo-lr1e3.open_clip", "cirr-val")
    assert f"benchmark_scores[{unscored}]: never materialized" in out
    assert f"benchmark_scores[{scored[0]}]: never materialized" not in out
    unconfigured = score_partition_key("tiny__demo-lr1e3.open_clip", "fashioniq-val")
    assert str(unconfigured) not in out
