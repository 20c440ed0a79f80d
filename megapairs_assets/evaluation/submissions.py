"""Files for the CIRCO and CIRR evaluation servers (test splits keep their answers hidden).

Formats, from the benchmarks' own instructions:

- CIRCO test (circo.micc.unifi.it): one JSON object {"<query id>": [top-50 image ids], ...}
  covering every test query; the ids are COCO image ids (integers).
- CIRR test1 (cirr.cecs.anu.edu.au): one JSON object per metric: {"<pairid>": [top-50 image
  names]} for Recall, {"<pairid>": [top-3 names]} for Recall_subset, each with the extra
  entries "version": "rc2" and "metric": "recall" | "recall_subset". Rankings exclude the
  reference image, as on the validation split.

The parsers read these files back with the same checks a server makes on shape, so a file
that parses here has the form the server expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from megapairs_assets.lib.storage import write_atomic

CIRCO_TOP = 50
CIRR_TOP = {"recall": 50, "recall_subset": 3}
CIRR_VERSION = "rc2"


class SubmissionError(ValueError):
    """A submission file that a server would refuse."""


def write_circo_submission(path: Path, rankings: Mapping[str, Sequence[str]]) -> Path:
    """Write {query id: top-50 COCO ids (as integers)} for the CIRCO test server."""
    payload = {}
    for query_id, ids in rankings.items():
        if len(ids) < CIRCO_TOP:
            raise SubmissionError(
                f"CIRCO query {query_id}: {len(ids)} results, the server wants {CIRCO_TOP}"
            )
        payload[str(query_id)] = [int(image_id) for image_id in ids[:CIRCO_TOP]]
    _write_json(path, payload)
    return path


def parse_circo_submission(
    path: Path, expected_query_ids: Sequence[str] | None = None
) -> dict[str, list[int]]:
    """Read a CIRCO submission back; checks ids, lengths and (optionally) query coverage."""
    payload = _read_json_object(path)
    parsed: dict[str, list[int]] = {}
    for query_id, ids in payload.items():
        if not str(query_id).isdigit():
            raise SubmissionError(f"{path}: query id {query_id!r} is not a number")
        if not isinstance(ids, list) or len(ids) != CIRCO_TOP:
            raise SubmissionError(f"{path}: query {query_id} needs a list of {CIRCO_TOP} ids")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise SubmissionError(f"{path}: query {query_id} lists non-integer image ids")
        if len(set(ids)) != len(ids):
            raise SubmissionError(f"{path}: query {query_id} repeats an image id")
        parsed[query_id] = ids
    _check_coverage(path, parsed, expected_query_ids)
    return parsed


def write_cirr_submission(path: Path, metric: str, rankings: Mapping[str, Sequence[str]]) -> Path:
    """Write a CIRR test1 file for `metric` ("recall": top 50, "recall_subset": top 3)."""
    top = _cirr_top(metric)
    payload: dict[str, object] = {"version": CIRR_VERSION, "metric": metric}
    for pair_id, names in rankings.items():
        if len(names) < top:
            raise SubmissionError(
                f"CIRR pair {pair_id}: {len(names)} results, {metric} needs {top}"
            )
        payload[str(pair_id)] = [str(name) for name in names[:top]]
    _write_json(path, payload)
    return path


def parse_cirr_submission(
    path: Path, expected_pair_ids: Sequence[str] | None = None
) -> tuple[str, dict[str, list[str]]]:
    """Read a CIRR submission back: (metric, {pairid: names})."""
    payload = dict(_read_json_object(path))
    if payload.pop("version", None) != CIRR_VERSION:
        raise SubmissionError(f'{path}: "version" must be "{CIRR_VERSION}"')
    metric = payload.pop("metric", None)
    if metric not in CIRR_TOP:
        raise SubmissionError(f'{path}: "metric" must be one of {sorted(CIRR_TOP)}')
    top = CIRR_TOP[metric]
    parsed: dict[str, list[str]] = {}
    for pair_id, names in payload.items():
        if not str(pair_id).isdigit():
            raise SubmissionError(f"{path}: pairid {pair_id!r} is not a number")
        if not isinstance(names, list) or len(names) != top:
            raise SubmissionError(f"{path}: pair {pair_id} needs a list of {top} names")
        if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise SubmissionError(f"{path}: pair {pair_id} lists non-string or repeated names")
        parsed[pair_id] = names
    _check_coverage(path, parsed, expected_pair_ids)
    return metric, parsed


def _cirr_top(metric: str) -> int:
    if metric not in CIRR_TOP:
        raise SubmissionError(f"CIRR metric must be one of {sorted(CIRR_TOP)}, not {metric!r}")
    return CIRR_TOP[metric]


def _check_coverage(
    path: Path, parsed: Mapping[str, object], expected: Sequence[str] | None
) -> None:
    if expected is None:
        return
    missing = sorted(set(map(str, expected)) - set(parsed))
    extra = sorted(set(parsed) - set(map(str, expected)))
    if missing or extra:
        raise SubmissionError(
            f"{path}: {len(missing)} queries missing (e.g. {missing[:3]}), "
            f"{len(extra)} unknown (e.g. {extra[:3]}); the server wants every test query once"
        )


def _write_json(path: Path, payload: Mapping[str, object]) -> None:
    text = json.dumps(payload, sort_keys=True)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_json_object(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SubmissionError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
    if not isinstance(payload, dict):
        raise SubmissionError(f"{path}: expected a JSON object")
    return payload
