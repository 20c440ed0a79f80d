"""The real code location's GPU steps, rendered as the pods dagster-k8s would launch for them.

Placement tags are fixed when the asset modules load (cluster settings and the paper profile's
`MEGAPAIRS_TRAIN_DEVICES` come from the environment then), so the cluster case loads the
definitions in a fresh interpreter with the cluster environment of tests/test_scaleout_k8s.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from tests.test_scaleout_k8s import CLUSTER_ENV

dagster_k8s_job = pytest.importorskip("dagster_k8s.job")

REPO = Path(__file__).resolve().parents[1]
GPU_ASSETS = (
    "clip_image_embeddings",
    "dino_image_embeddings",
    "caption_text_embeddings",
    "mmret_clip_checkpoint",
    "benchmark_scores",
)


def render_step_pods(defs: dg.Definitions, asset_names: list[str]) -> dict[str, dict]:
    """asset name -> the step pod spec (as the Kubernetes API takes it) that dagster-k8s's
    step launcher would submit for that asset's op."""
    from kubernetes.client import ApiClient

    graph = defs.resolve_asset_graph()
    job_config = dagster_k8s_job.DagsterK8sJobConfig(
        job_image="registry.example/megapairs:test",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
    )
    pods = {}
    for name in asset_names:
        assets_def = graph.assets_def_for_key(dg.AssetKey(name))
        tags = {k: v for k, v in assets_def.op.tags.items() if isinstance(v, str)}
        job = dagster_k8s_job.construct_dagster_k8s_job(
            job_config,
            args=["dagster", "api", "execute_step"],
            job_name=f"dagster-step-{name.replace('_', '-')}",
            user_defined_k8s_config=dagster_k8s_job.get_user_defined_k8s_config(tags),
            component="step_worker",
        )
        pods[name] = ApiClient().sanitize_for_serialization(job.spec.template.spec)
    return pods


def _knn_assets(defs: dg.Definitions) -> list[str]:
    return sorted(
        key.to_user_string()
        for key in defs.resolve_asset_graph().get_all_asset_keys()
        if key.to_user_string().endswith("_knn")
    )


def _gpu_limit(pod: dict) -> str | None:
    (container,) = pod["containers"]
    return ((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")


def test_every_gpu_asset_of_the_paper_definitions_asks_for_gpus(tmp_path: Path) -> None:
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.training.assets import TRAINING_GPUS

    defs = build_definitions("paper", tmp_path)
    knn = _knn_assets(defs)
    assert len(knn) == 3
    pods = render_step_pods(defs, [*GPU_ASSETS, *knn])
    for name in (*GPU_ASSETS[:3], *knn, "benchmark_scores"):
        assert _gpu_limit(pods[name]) == "1", name
    assert TRAINING_GPUS >= 1
    assert _gpu_limit(pods["mmret_clip_checkpoint"]) == str(TRAINING_GPUS)
    # A CPU asset asks for no GPU.
    (cpu_pod,) = render_step_pods(defs, ["mined_image_pairs"]).values()
    assert _gpu_limit(cpu_pod) is None
    # Off the cluster, the asset pages show no placement tags (the machine is not a pod's).
    graph = defs.resolve_asset_graph()
    for name in GPU_ASSETS:
        tags = graph.get(dg.AssetKey(name)).tags
        assert not any(key.startswith("megapairs/") for key in tags), (name, tags)


_CLUSTER_SCRIPT = """
import json, sys
from pathlib import Path
import dagster as dg
from megapairs_assets.definitions import build_definitions
from tests.test_scaleout_k8s_real_defs import GPU_ASSETS, _knn_assets, render_step_pods
defs = build_definitions("paper", Path(sys.argv[1]))
graph = defs.resolve_asset_graph()
tags = {name: dict(graph.get(dg.AssetKey(name)).tags) for name in GPU_ASSETS}
print(json.dumps([render_step_pods(defs, [*GPU_ASSETS, *_knn_assets(defs)]), tags]))
"""


def test_on_the_cluster_training_takes_the_profiles_gpus_on_gpu_nodes(tmp_path: Path) -> None:
    env = {**os.environ, **CLUSTER_ENV, "MEGAPAIRS_TRAIN_DEVICES": "4", "PYTHONPATH": str(REPO)}
    env["MEGAPAIRS_STEP_EXECUTOR"] = "process"  # the definitions' executor, not the pods
    done = subprocess.run(
        [sys.executable, "-c", _CLUSTER_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pods, tags = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(pods) == len(GPU_ASSETS) + 3
    # On the cluster, each asset's page says what its step asks for.
    assert tags["mmret_clip_checkpoint"]["megapairs/gpu"] == "4"
    assert tags["benchmark_scores"]["megapairs/gpu"] == "1"
    for name, pod in pods.items():
        (container,) = pod["containers"]
        expected = "4" if name == "mmret_clip_checkpoint" else "1"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == expected, name
        assert container["resources"]["requests"]["nvidia.com/gpu"] == expected, name
        assert container["resources"]["limits"]["memory"], name
        assert pod["nodeSelector"] == {
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
            "pool": "gpu",
        }, name
        assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu", "dedicated"}, name
    # Memory follows the GPU count: 4 training GPUs need more host memory than one.
    training = pods["mmret_clip_checkpoint"]["containers"][0]["resources"]["limits"]["memory"]
    scoring = pods["benchmark_scores"]["containers"][0]["resources"]["limits"]["memory"]
    assert int(training.removesuffix("Gi")) > int(scoring.removesuffix("Gi"))
