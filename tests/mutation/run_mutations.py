"""Plant known bugs one at a time in a copy of the repository and see whether the tests notice.

Usage (from the repository root; takes a few minutes, most of it the two graph-level mutants):

    .venv/bin/python tests/mutation/run_mutations.py            # every mutant
    .venv/bin/python tests/mutation/run_mutations.py 2 6        # only mutants whose id starts so

The repository is copied to a temporary folder (without .venv, megapairs_home, .git and
caches). The unmutated copy is tested first: a mutant only counts as caught when the same tests
pass without it. Each mutant is a text substitution in product code, applied to the copy and
undone before the next one; the tests that should catch it then run with the venv's pytest and
PYTHONPATH pointing at the copy. A pattern that no longer matches (the code moved or changed)
is reported as "pattern not found" rather than stopping the run; update the pattern then.

Each mutant is one of the bugs that once passed the whole suite (issue 15); this file is not
collected by pytest (no `test_` prefix).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COPY_IGNORES = (
    ".venv",
    "megapairs_home",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
)
PYTEST_TIMEOUT_S = 900


@dataclass(frozen=True)
class Substitution:
    """Replace `pattern` (a regex) by `replacement` in the first of `files` where it matches."""

    files: tuple[str, ...]
    pattern: str
    replacement: str
    # Optional substitutions may find nothing (a line the lead may have dropped) without making
    # the mutant "pattern not found"; the mutant still needs its required ones.
    optional: bool = False


@dataclass(frozen=True)
class Mutant:
    """A bug, how to plant it, and the fast tests that must catch it."""

    mutant_id: str
    bug: str
    substitutions: tuple[Substitution, ...]
    tests: tuple[str, ...]


PAIRS = ("megapairs_assets/mining/pairs.py",)
MINING_STEP = ("megapairs_assets/mining/step.py", "megapairs_assets/mining/assets.py")
CORPUS_STEP = (
    "megapairs_assets/corpus/step.py",
    "megapairs_assets/corpus/assets.py",
    "megapairs_assets/corpus/table.py",
)
STORAGE = ("megapairs_assets/lib/storage.py", "megapairs_assets/storage.py")
EMBED = ("megapairs_assets/embeddings/compute.py",)
IMAGES = ("megapairs_assets/corpus/images.py",)
MINING_TESTS = ("tests/test_mining_pairs.py",)
GRAPH_TESTS = ("tests/test_graph_runs.py",)

MUTANTS = (
    Mutant(
        "1a",
        "pair ids hashed with Python's hash() (differs between processes)",
        (
            Substitution(
                PAIRS,
                r"hashlib\.blake2b\((payload(?:\.encode\(\))?)\)\.hexdigest\(\)\[:16\]",
                r'format(hash(\1) & 0xFFFFFFFFFFFFFFFF, "016x")',
            ),
        ),
        MINING_TESTS,
    ),
    Mutant(
        "1b",
        "id hashes behind the query sample and negative order from Python's hash()",
        (
            Substitution(
                PAIRS,
                r"hashlib\.blake2b\(identifier\.encode\(\), digest_size=8\)\.digest\(\)",
                r'(hash(identifier) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")',
            ),
        ),
        MINING_TESTS,
    ),
    Mutant(
        "2",
        "query_fraction keeps the complement of the sample",
        (
            Substitution(
                PAIRS,
                r"unit_interval < params\.query_fraction",
                "unit_interval >= params.query_fraction",
            ),
        ),
        MINING_TESTS,
    ),
    Mutant(
        "3",
        "mean_mined_negatives_per_pair counts the query image",
        (
            Substitution(
                PAIRS,
                r'(summary\["mean_mined_negatives_per_pair"\] = ).*',
                r"\1mean_negatives",
            ),
        ),
        MINING_TESTS,
    ),
    Mutant(
        "4",
        "L2 normalisation done in float16",
        (Substitution(EMBED, r"normalize\(raw\.float\(\)", "normalize(raw.half()"),),
        ("tests/test_embedding_compute.py",),
    ),
    Mutant(
        "5",
        "minimum side check off by one (16 px rejected)",
        (
            Substitution(
                IMAGES,
                r"min\(width_px, height_px\) < limits\.min_side_px",
                "min(width_px, height_px) <= limits.min_side_px",
            ),
        ),
        ("tests/test_net_image_limits.py",),
    ),
    Mutant(
        "6",
        "cross-shard duplicate query loses its 'other shard' condition",
        # Keeps the number of SQL parameters, so the query still runs (a crash would be loud).
        (Substitution(CORPUS_STEP, r"WHERE shard <> \? AND ", "WHERE ? IS NOT NULL AND "),),
        GRAPH_TESTS,
    ),
    Mutant(
        "7",
        "pair_lineage.knn_versions recorded empty",
        (Substitution(MINING_STEP, r"json\.dumps\(knn_versions,", "json.dumps({},"),),
        GRAPH_TESTS,
    ),
    Mutant(
        "8a",
        "Parquet written in place instead of temp-then-move",
        (
            Substitution(
                STORAGE,
                r"write_atomic\(path, lambda tmp: frame\.write_parquet\(tmp, ([^)]*)\)\)",
                r"frame.write_parquet(path, \1)",
            ),
        ),
        ("tests/test_net_storage.py",),
    ),
    Mutant(
        "8b",
        "write_atomic writes straight onto the target",
        (
            Substitution(STORAGE, r"\bwrite\(tmp\)", "write(path)"),
            Substitution(STORAGE, r"os\.chmod\(tmp,", "os.chmod(path,", optional=True),
            Substitution(STORAGE, r"os\.replace\(tmp, path\)", "pass"),
        ),
        ("tests/test_net_storage.py",),
    ),
)

# Which tests of a file to run for a mutant: in the graph file only the tests on the small run's
# re-materialization and catalog rows (one shared selection, so one baseline run).
GRAPH_SELECTION = "rematerializing or pair_lineage or lineage_chain"
TEST_SELECTION = {"6": GRAPH_SELECTION, "7": GRAPH_SELECTION}


def copy_repository(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*COPY_IGNORES), symlinks=True)


def venv_python(repo: Path) -> str:
    candidate = repo / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def env_for_copy(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy), env.get("PYTHONPATH")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("MEGAPAIRS_HOME", None)
    return env


def plant(copy: Path, mutant: Mutant) -> dict[Path, str] | str:
    """Apply the mutant's substitutions; return the original texts, or why it could not."""
    originals: dict[Path, str] = {}
    for substitution in mutant.substitutions:
        for relative in substitution.files:
            path = copy / relative
            if not path.exists():
                continue
            text = path.read_text()
            mutated, count = re.subn(substitution.pattern, substitution.replacement, text)
            if count:
                originals.setdefault(path, text)
                path.write_text(mutated)
                break
        else:
            if not substitution.optional:
                restore(originals)
                return f"pattern not found: {substitution.pattern!r} in {substitution.files}"
    return originals


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text)


def run_tests(copy: Path, python: str, tests: tuple[str, ...], selection: str | None) -> tuple:
    """Run pytest in the copy; return (return code, seconds, failing tests or the last line)."""
    command = [python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    if selection:
        command += ["-k", selection]
    start_s = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=copy,
            env=env_for_copy(copy),
            capture_output=True,
            text=True,
            timeout=PYTEST_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start_s, f"timed out after {PYTEST_TIMEOUT_S} s"
    seconds = time.perf_counter() - start_s
    lines = (done.stdout + done.stderr).splitlines()
    failed = [
        line.split(" - ")[0].split("::")[-1]
        for line in lines
        if line.startswith(("FAILED ", "ERROR "))
    ]
    summary = ", ".join(failed) if failed else (lines[-1] if lines else "")
    return done.returncode, seconds, summary


def check_imports_come_from(copy: Path, python: str) -> None:
    probe = "import megapairs_assets, resources; print(megapairs_assets.__file__)"
    done = subprocess.run(
        [python, "-c", probe], cwd=copy, env=env_for_copy(copy), capture_output=True, text=True
    )
    if not done.stdout.strip().startswith(str(copy)):
        raise SystemExit(f"the copy does not shadow the installed package: {done.stdout!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="run only mutants whose id starts with these")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository to copy")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.mutant_id.startswith(tuple(args.only))]
    python = venv_python(args.repo)
    results: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="megapairs-mutants-") as temp:
        copy = Path(temp) / "repo"
        copy_repository(args.repo, copy)
        check_imports_come_from(copy, python)
        print(f"copy of {args.repo} at {copy}; python {python}", flush=True)

        baseline_ok: dict[tuple, bool] = {}
        for mutant in chosen:
            key = (mutant.tests, TEST_SELECTION.get(mutant.mutant_id))
            if key not in baseline_ok:
                code, seconds, summary = run_tests(copy, python, *key)
                baseline_ok[key] = code == 0
                state = "pass" if code == 0 else f"FAIL (rc {code}): {summary}"
                print(f"baseline {' '.join(key[0])} [-k {key[1]}]: {state} ({seconds:.0f} s)")

        for mutant in chosen:
            key = (mutant.tests, TEST_SELECTION.get(mutant.mutant_id))
            planted = plant(copy, mutant)
            if isinstance(planted, str):
                verdict, detail = "pattern not found", planted
            elif not baseline_ok[key]:
                restore(planted)
                verdict, detail = "unknown", "the tests fail without the mutant too"
            else:
                try:
                    code, seconds, summary = run_tests(copy, python, *key)
                finally:
                    restore(planted)
                if code == 1:
                    verdict, detail = "caught", f"{summary} ({seconds:.0f} s)"
                elif code == 0:
                    verdict, detail = "MISSED", f"all selected tests passed ({seconds:.0f} s)"
                else:
                    verdict, detail = f"error (rc {code})", f"{summary} ({seconds:.0f} s)"
            results.append((mutant.mutant_id, verdict))
            print(
                f"mutant {mutant.mutant_id:<3} {verdict:<17} {mutant.bug}\n    {detail}", flush=True
            )

    caught = sum(verdict == "caught" for _, verdict in results)
    print(f"\n{caught} of {len(results)} mutants caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
