"""Long lists of ids as one lineage-catalog query parameter.

DuckDB's Python client converts a list parameter element by element, and for each string it
tries `import pandas` (to recognise pandas' missing-value markers); where pandas is not
installed that failed import is searched for on `sys.path` again every time. A list of 15,000
image ids (one shard's KNN neighbours) then took ~2.5 s to bind, longer than the whole mining
step's work. One JSON string is bound as a single value and split by DuckDB itself (~20 ms for
the same list), for any characters an id may hold.

Use `IN_IDS` in place of `IN (SELECT unnest(?))` and pass `id_list(ids)` as its parameter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

IN_IDS = "IN (SELECT unnest(from_json(?, '[\"VARCHAR\"]')))"
"""SQL: `<column> IN <the ids of one id_list parameter>`; an empty list matches nothing."""


def id_list(ids: Iterable[str]) -> str:
    """The parameter `IN_IDS` reads: the ids as one JSON array."""
    return json.dumps([str(value) for value in ids], ensure_ascii=False)
