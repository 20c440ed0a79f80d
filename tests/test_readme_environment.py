"""Every MEGAPAIRS_* variable the code reads is in the README, and a server error names the
variable that set its URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from resources.environment import KNOWN_VARIABLES
from resources.profiles import _urls_setting_name

REPO = Path(__file__).resolve().parents[1]


def _documented(name: str, text: str) -> bool:
    # A table row may shorten a sibling's name: `MEGAPAIRS_CIRCO_ROOT`, `_CIRR_ROOT`.
    parts = name.split("_")
    forms = [f"`{name}`"] + [f"`_{'_'.join(parts[i:])}`" for i in range(1, len(parts) - 1)]
    return any(form in text for form in forms)


def test_every_known_variable_is_documented() -> None:
    text = (REPO / "README.md").read_text() + (REPO / "deployment" / "README.md").read_text()
    missing = sorted(name for name in KNOWN_VARIABLES if not _documented(name, text))
    assert not missing, f"not in README.md or deployment/README.md: {missing}"


def test_a_server_error_names_the_shared_urls_variable_when_only_it_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = "MEGAPAIRS_VLLM_DESCRIBE_URLS"
    monkeypatch.delenv(own, raising=False)
    monkeypatch.delenv("MEGAPAIRS_VLLM_BASE_URLS", raising=False)
    assert _urls_setting_name(own) == own
    monkeypatch.setenv("MEGAPAIRS_VLLM_BASE_URLS", "http://127.0.0.1:8009/v1")
    assert _urls_setting_name(own).startswith("MEGAPAIRS_VLLM_BASE_URLS (or " + own)
    monkeypatch.setenv(own, "http://127.0.0.1:8010/v1")
    assert _urls_setting_name(own) == own
