"""The embedded demo: a bundled corpus and small local models built on first use."""

from pathlib import Path

DEMO_CORPUS_DIR = Path(__file__).parent / "corpus"
