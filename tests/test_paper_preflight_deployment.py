"""The cluster's generation servers (deployment/vllm.yaml) serve what the `paper` profile asks
for, where the code location's environment (deployment/helm-values.yaml) says they are."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from megapairs_assets.generation.settings import PAPER_DESCRIBE_MODEL, PAPER_INSTRUCT_MODEL
from resources.profiles import GENERATION_VARIABLES, build_resources

DEPLOYMENT = Path(__file__).resolve().parents[1] / "deployment"
MODELS = {"describe": PAPER_DESCRIBE_MODEL, "instruct": PAPER_INSTRUCT_MODEL}


def _flags(args: list[str]) -> dict[str, str]:
    """`--name=value` / `--name` arguments of `vllm serve` as {name: value ("" for a switch)}."""
    flags = {}
    for arg in args[2:]:
        name, _, value = arg.partition("=")
        assert name.startswith("--"), f"{arg}: write every option as --name=value"
        flags[name] = value
    return flags


def _manifests() -> tuple[dict[str, dict], dict[str, dict]]:
    documents = [d for d in yaml.safe_load_all((DEPLOYMENT / "vllm.yaml").read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {"Deployment": {}, "Service": {}}
    for document in documents:
        by_kind[document["kind"]][document["metadata"]["name"]] = document
    return by_kind["Deployment"], by_kind["Service"]


def _location_env() -> dict[str, str]:
    values = yaml.safe_load((DEPLOYMENT / "helm-values.yaml").read_text())
    (location,) = values["dagster-user-deployments"]["deployments"]
    return {item["name"]: item.get("value", "") for item in location["env"]}


@pytest.mark.parametrize("step", ["describe", "instruct"])
def test_each_step_has_a_server_serving_the_profiles_model_at_its_url(step: str) -> None:
    deployments, services = _manifests()
    name = f"vllm-{step}"
    (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
    flags = _flags(container["args"])
    # Served under the hub id the profile sends, so no *_MODEL variable is needed.
    assert flags["--served-model-name"] == MODELS[step]
    # The code location's URL variable names this Service, its port and the /v1 prefix.
    urls_variable = GENERATION_VARIABLES[step][0]
    url = urlsplit(_location_env()[urls_variable])
    assert url.hostname.split(".")[:2] == [name, deployments[name]["metadata"]["namespace"]]
    assert url.port == services[name]["spec"]["ports"][0]["port"]
    assert url.path == "/v1"
    assert int(flags["--port"]) == container["ports"][0]["containerPort"]


def test_the_describe_server_takes_two_images_and_the_models_code() -> None:
    deployments, _ = _manifests()
    (container,) = deployments["vllm-describe"]["spec"]["template"]["spec"]["containers"]
    flags = _flags(container["args"])
    assert "--trust-remote-code" in flags
    # vLLM (0.10+) reads this limit as JSON; the describe request carries two images.
    assert json.loads(flags["--limit-mm-per-prompt"])["image"] >= 2


def test_the_paper_profile_reads_the_urls_the_cluster_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _location_env()
    monkeypatch.delenv("MEGAPAIRS_VLLM_BASE_URLS", raising=False)
    for step in MODELS:
        for variable in GENERATION_VARIABLES[step]:
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv(GENERATION_VARIABLES[step][0], env[GENERATION_VARIABLES[step][0]])
    settings = build_resources("paper", tmp_path)["generation"].settings()
    for step, model in MODELS.items():
        backend = getattr(settings, step).backend
        assert backend.model_id == model and "served_model" not in backend.options
        assert backend.options["base_urls"] == [env[GENERATION_VARIABLES[step][0]]]
    assert "MEGAPAIRS_VLLM_BASE_URLS" not in env  # one endpoint for both models is not the setup
