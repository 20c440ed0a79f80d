"""Browser-level check of the Dagster UI: the asset graph, the pairs asset, triplets, the
checkpoint, the scores, the corpus and KNN partitions and the runs list, as screenshots.

    MEGAPAIRS_HOME=/tmp/mp_ui .venv/bin/megapairs demo --quiet      # data to look at
    MEGAPAIRS_HOME=/tmp/mp_ui .venv/bin/python scripts/ui_screenshots.py /tmp/mp_ui_shots

Starts the UI the way `megapairs ui` does (this environment's Dagster on workspace.yaml, the
data root's Dagster instance) on a free port, waits until the code location has loaded, then
opens each page in headless Chromium and saves a PNG per page into the folder given. The
server is stopped at the end, whatever happened. `--page PATH` adds any page (e.g. a run's
`/runs/<run id>` log; `--only-pages` skips the tour). Needs a Chromium binary (Debian:
`apt-get install chromium`); `--chromium PATH` picks another.

Chromium's own `--screenshot` mode is used: `--virtual-time-budget` lets the page run its
scripts and GraphQL requests before the picture is taken, with no browser-driver package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PAIRS_ASSET = "mined_image_pairs"
PAIRS_PAGE = f"/assets/{PAIRS_ASSET}"
# (file name, path on the UI, window height in px): the global asset graph, the pairs asset's
# upstream lineage, then its tabs; tall windows where the metadata runs long.
PAGES: tuple[tuple[str, str, int], ...] = (
    ("01_asset_graph", "/asset-groups", 1000),
    ("02_pairs_lineage", f"{PAIRS_PAGE}?view=lineage&lineageScope=upstream", 1000),
    ("03_pairs_overview", f"{PAIRS_PAGE}?view=overview", 1700),
    ("04_pairs_partitions", f"{PAIRS_PAGE}?view=partitions", 1000),
    ("05_pairs_partition_00001", f"{PAIRS_PAGE}?view=partitions&partition=00001", 1300),
    ("06_pairs_checks", f"{PAIRS_PAGE}?view=checks", 1100),
    ("07_pairs_events", f"{PAIRS_PAGE}?view=events", 1300),
    # The second half: what a person reads at a glance (examples, loss curve, scores).
    ("08_triplets_partition_00000", "/assets/triplets?view=partitions&partition=00000", 1800),
    ("09_checkpoint_overview", "/assets/mmret_clip_checkpoint?view=overview", 1700),
    ("10_scores_overview", "/assets/benchmark_scores?view=overview", 1500),
    # The first half's partitions: thumbnails, the KNN score histogram, the run's log.
    ("11_corpus_partition_00000", "/assets/image_corpus?view=partitions&partition=00000", 1500),
    ("12_knn_partition_00000", "/assets/clip_image_knn?view=partitions&partition=00000", 1900),
    ("13_runs", "/runs", 1000),
)
WINDOW_WIDTH_PX = 1600
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STARTUP_TIMEOUT_S = 180.0
PAGE_TIMEOUT_S = 120.0


def page_file_name(page: str) -> str:
    """A readable file name for a UI path: '/assets/x?view=partitions&partition=00001' ->
    'x_partitions_00001' (only letters, digits, '_' and '-')."""
    path, _, query = page.partition("?")
    parts = [path.removeprefix("/assets/").strip("/")]
    parts += [value for _, _, value in (item.partition("=") for item in query.split("&")) if value]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", "_".join(p for p in parts if p)).strip("_")
    return name[:80] or "page"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_chromium(explicit: str | None) -> str:
    """The Chromium binary to use, or exit with the install line."""
    for candidate in [explicit] if explicit else list(CHROMIUM_NAMES):
        found = shutil.which(candidate)
        if found:
            return found
    raise SystemExit("no Chromium found: `apt-get install chromium`, or pass --chromium PATH")


def start_ui(port: int, log_path: Path) -> subprocess.Popen:
    """Start the environment's Dagster dev server on the workspace, in its own process group."""
    from megapairs_assets.cli.instance import prepare_dagster_home
    from megapairs_assets.cli.ui import WORKSPACE_FILE, dagster_dev_command
    from megapairs_assets.lib.storage import default_home

    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(prepare_dagster_home(default_home()))
    command = dagster_dev_command(WORKSPACE_FILE, "127.0.0.1", port)
    with log_path.open("w") as log:
        return subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_ui(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL what is left after a short grace."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        break
    # Children (code server, daemon) may outlive the leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def wait_for_assets(port: int, process: subprocess.Popen, log_path: Path) -> int:
    """Wait until the server answers and the code location lists its assets; return the count."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the UI exited ({process.returncode}):\n{log_path.read_text()}")
        with contextlib.suppress(OSError, ValueError):
            nodes = graphql(port, "{ assetNodes { id } }")["data"]["assetNodes"]
            if nodes:
                return len(nodes)
        time.sleep(1.0)
    raise SystemExit(f"the UI did not list any asset in {STARTUP_TIMEOUT_S:.0f} s")


def screenshot(chromium: str, url: str, path: Path, profile_dir: Path, height_px: int) -> None:
    """One headless Chromium run: load `url`, let it settle, write a PNG to `path`."""
    command = [
        chromium,
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile_dir}",
        f"--window-size={WINDOW_WIDTH_PX},{height_px}",
        "--virtual-time-budget=20000",
        f"--screenshot={path}",
        url,
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=PAGE_TIMEOUT_S)
    if not path.is_file() or path.stat().st_size == 0:
        raise SystemExit(f"Chromium wrote no screenshot for {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the PNG files (created)")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: on PATH)")
    parser.add_argument(
        "--page",
        action="append",
        default=[],
        metavar="PATH",
        help="another UI path to capture (repeatable), e.g. "
        "'/assets/clip_image_embeddings?view=partitions&partition=00000'",
    )
    parser.add_argument(
        "--height",
        type=int,
        default=1600,
        metavar="PX",
        help="window height of the --page captures (default 1600; asset pages run long)",
    )
    parser.add_argument(
        "--only-pages",
        action="store_true",
        help="capture only the --page paths, not the built-in tour",
    )
    args = parser.parse_args(argv)
    pages = ([] if args.only_pages else list(PAGES)) + [
        (f"{len(PAGES) + index + 1:02d}_{page_file_name(page)}", page, args.height)
        for index, page in enumerate(args.page)
    ]

    chromium = find_chromium(args.chromium)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    log_path = args.out_dir / "ui.log"
    process = start_ui(port, log_path)
    try:
        assets = wait_for_assets(port, process, log_path)
        print(f"UI on http://127.0.0.1:{port} lists {assets} assets")
        # What the "Skip" button of the first-visit community dialog does; without it the
        # dialog covers every screenshot.
        graphql(port, "mutation { setNuxSeen }")
        profile_dir = args.out_dir / ".chromium-profile"
        for name, page, height_px in pages:
            path = args.out_dir / f"{name}.png"
            screenshot(chromium, f"http://127.0.0.1:{port}{page}", path, profile_dir, height_px)
            print(f"  {page} -> {path}")
    finally:
        stop_ui(process)
        shutil.rmtree(args.out_dir / ".chromium-profile", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
