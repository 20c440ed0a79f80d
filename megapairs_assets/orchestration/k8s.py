"""Asset tags -> the `dagster-k8s/config` op tag that places a step's pod on Kubernetes.

An asset says what one of its steps needs in plain string tags (`step_resource_tags`):
`megapairs/gpu` (count of `nvidia.com/gpu`), `megapairs/memory` and `megapairs/cpu`
(Kubernetes quantities). Where a cluster puts GPU steps (node labels, taints it must tolerate)
is the deployment's business, not the asset's, and comes from the cluster settings.
`k8s_op_tags` turns both into the `dagster-k8s/config` tag that dagster-k8s's
`k8s_job_executor` (one pod per step) and `K8sRunLauncher` read: container resource
requests/limits, and a pod node selector and tolerations when the step asks for a GPU. No pod
spec is built by hand; dagster-k8s builds it from this tag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY
GPU_TAG, MEMORY_TAG, CPU_TAG = "megapairs/gpu", "megapairs/memory", "megapairs/cpu"
GPU_RESOURCE = "nvidia.com/gpu"


def step_resource_tags(
    gpu: int = 0, memory: str | None = None, cpu: str | None = None
) -> dict[str, str]:
    """Asset tags declaring what one step of the asset needs (strings, as asset tags must be)."""
    if gpu < 0:
        raise ValueError(f"gpu must be >= 0, got {gpu}")
    tags = {GPU_TAG: str(gpu)} if gpu else {}
    if memory:
        tags[MEMORY_TAG] = memory
    if cpu:
        tags[CPU_TAG] = cpu
    return tags


def k8s_op_tags(
    tags: Mapping[str, str],
    gpu_node_selector: Mapping[str, str] | None = None,
    gpu_tolerations: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """The op tags that give a step its Kubernetes resources; empty when the tags ask nothing.

    GPUs are requested and limited (Kubernetes requires both equal for extended resources);
    memory is requested and limited (a step past it is killed, not left to starve its node);
    CPU is only requested (bursting on an idle node is harmless).
    """
    gpu = int(tags.get(GPU_TAG, "0") or 0)
    memory, cpu = tags.get(MEMORY_TAG), tags.get(CPU_TAG)
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if gpu:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpu)
    if memory:
        requests["memory"] = limits["memory"] = memory
    if cpu:
        requests["cpu"] = cpu
    if not requests:
        return {}
    config: dict[str, Any] = {"container_config": {"resources": {"requests": requests}}}
    if limits:
        config["container_config"]["resources"]["limits"] = limits
    if gpu:
        pod_spec: dict[str, Any] = {}
        if gpu_node_selector:
            pod_spec["node_selector"] = dict(gpu_node_selector)
        if gpu_tolerations:
            pod_spec["tolerations"] = [dict(t) for t in gpu_tolerations]
        if pod_spec:
            config["pod_spec_config"] = pod_spec
    return {K8S_CONFIG_TAG: config}
