"""`megapairs` starts without the heavy libraries a command does not use.

Every command builds the whole parser (each subcommand module's `register`), so a module-level
`import torch` anywhere in them made `megapairs lineage --help` take ~2 s and 0.7 GB. These
run the parser in a fresh interpreter and look at what it imported; the constants the CLI
spells to stay light are checked against the modules that own them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Libraries no `--help` needs: models, vector search, training, orchestration, query engines.
HEAVY = ("torch", "open_clip", "transformers", "faiss", "lightning", "dagster", "duckdb", "polars")


def _modules_after(code: str) -> set[str]:
    """Top-level module names imported by a fresh interpreter running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


@pytest.mark.parametrize(
    "argv", [["--help"], ["lineage", "--help"], ["eval", "--help"], ["search", "--help"]]
)
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    code = (
        "from megapairs_assets.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as done:\n    assert done.code == 0\n"
    )
    assert not _modules_after(code) & set(HEAVY)


def test_building_the_parser_imports_no_heavy_library() -> None:
    code = "from megapairs_assets.cli.main import build_parser\nbuild_parser()"
    assert not _modules_after(code) & set(HEAVY)


def test_spelled_constants_match_their_owners() -> None:
    from megapairs_assets.cli import lineage
    from megapairs_assets.evaluation import cli as evaluation_cli
    from megapairs_assets.evaluation.run import BENCHMARK_KEYS
    from megapairs_assets.lineage import report

    assert evaluation_cli.BENCHMARK_KEYS == BENCHMARK_KEYS
    assert all(key in evaluation_cli.BENCHMARK_HELP for key in BENCHMARK_KEYS)
    assert (lineage.DEFAULT_PAIR_LIMIT, lineage.MAX_INPUTS_SHOWN) == (
        report.DEFAULT_PAIR_LIMIT,
        report.MAX_INPUTS_SHOWN,
    )


def test_lineage_declares_every_row_table_the_definitions_do() -> None:
    """`megapairs lineage` imports only the modules that declare catalog row tables, not the
    whole Dagster definitions: a stage that adds a row table must be listed there too."""
    code = (
        "import importlib\n"
        "from megapairs_assets.cli.lineage import ROW_TABLE_MODULES\n"
        "from megapairs_assets.lineage.catalog import registered_row_tables\n"
        "for module in ROW_TABLE_MODULES:\n    importlib.import_module(module)\n"
        "lineage = sorted(registered_row_tables())\n"
        "import megapairs_assets.definitions\n"
        "print(json.dumps([lineage, sorted(registered_row_tables())]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    by_lineage, by_definitions = json.loads(done.stdout.splitlines()[-1])
    assert by_lineage == by_definitions


def test_device_resource_imports_torch_where_a_device_is_asked_for() -> None:
    # (resources/__init__.py imports every resource, so the module alone cannot be imported
    # without torch yet; this checks that the lazy imports still give the same answers.)
    import torch

    from resources.device import DeviceResource

    assert DeviceResource(device="cpu", dtype="float16").torch_dtype() is torch.float16
    assert DeviceResource(device="cpu").torch_dtype() is torch.float32
    assert DeviceResource(device="cpu").describe() == "cpu, float32"


# What a lineage lookup may load: its catalog (DuckDB, polars) and the storage resource's
# Dagster config classes, never the model or search code.
MODEL_CODE = ("torch", "open_clip", "transformers", "faiss", "lightning", "sentence_transformers")


def test_a_lineage_lookup_imports_no_model_code(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import os\n"
        f"os.environ['MEGAPAIRS_HOME'] = {str(home)!r}\n"
        "from megapairs_assets.lineage.catalog import LineageCatalog\n"
        f"LineageCatalog({str(home / 'catalog.duckdb')!r}).query('SELECT 1')\n"
        "from megapairs_assets.cli.main import main\n"
        "main(['lineage', 'no-such-id'])\n"
    )
    assert not _modules_after(code) & set(MODEL_CODE)
