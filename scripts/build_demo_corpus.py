"""Build the bundled demo corpus: 320 public-domain clip-art images in 5 webdataset shards.

The input is Debian's `openclipart-png` package (public domain; folder and file names describe
each picture, e.g. animals/mammals/housecats/kitten_gerald_g._01.png). Get it without
installing anything:

    apt-get download openclipart-png
    dpkg -x openclipart-png_*.deb /tmp/oc
    python scripts/build_demo_corpus.py --source /tmp/oc/usr/share/openclipart/png

The selection is curated and deterministic: `GROUPS` names fine categories (cats, flags,
stars, fruit, clocks, ...) and takes several pictures from each, so every image has real
neighbours for the pair miner to find. Near-empty, tiny or banner-shaped pictures are left
out, as are exact duplicates (the package files some pictures under several folders).
Transparency is composited on white, pictures are shrunk to at most 128 px on the longer side
and stored as JPEG. Captions come from the path, e.g. "a clip-art drawing of a kitten
(animals, mammals, housecats)", with a few deterministic phrasings.

Output, as img2dataset writes it: `00000.tar` ... `00004.tar` (64 samples each, members
`<9-digit key>.jpg`, `.txt` caption, `.json` with key/caption/width/height/original_path),
plus `manifest.jsonl` (shard, key, caption, original_path) and `LICENSE-openclipart.txt`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "megapairs_assets" / "demo" / "corpus"
SHARD_COUNT = 5
SAMPLES_PER_SHARD = 64
MAX_SIDE_PX = 128
JPEG_QUALITY = 85
SHUFFLE_SEED = 0
# A fixed timestamp makes the tar files byte-for-byte reproducible (2024-01-01T00:00:00Z).
TAR_MTIME = 1_704_067_200
# img2dataset keys: 5 digits of shard number, then 4 digits of position in the shard.
KEY_SAMPLE_DIGITS = 4

MIN_SOURCE_SIDE_PX = 48
# A few posters in the package are 170 megapixels: slow to decode and no better at 128 px.
MAX_SOURCE_PIXELS = 20_000_000
# MAX_SOURCE_PIXELS, checked from the header before decoding, is the bomb guard here.
Image.MAX_IMAGE_PIXELS = None
MIN_SOURCE_LONG_SIDE_PX = 96
MAX_ASPECT_RATIO = 3.5
# A pixel counts as drawn when it is visibly darker than the white background.
INK_THRESHOLD = 240
MIN_INK_FRACTION = 0.03
MIN_PIXEL_STD = 8.0
TRIM_MARGIN_FRACTION = 0.06
# The drawing itself, once trimmed, must still be big enough to mean something at 128 px.
MIN_DRAWING_SIDE_PX = 24
MIN_DRAWING_LONG_SIDE_PX = 64

PACKAGE = "openclipart-png 1:0.18+dfsg-19"
LICENSE_TEXT = f"""\
The images in this directory come from the Debian package {PACKAGE}
(https://packages.debian.org/openclipart-png), the PNG renderings of the Open Clip Art
Library (https://openclipart.org). Every image in that collection was released by its author
into the public domain; see /usr/share/doc/openclipart-png/copyright in the package.

They were selected, composited on white, trimmed of empty margins, shrunk to at most
{MAX_SIDE_PX} px on the longer side and re-encoded as JPEG by scripts/build_demo_corpus.py.
Each sample's .json records the path of its original file in the package (original_path).
"""

PHRASINGS = (
    "a clip-art drawing of {subject} ({categories})",
    "clip art of {subject} ({categories})",
    "a simple illustration of {subject} ({categories})",
    "a cartoon picture of {subject} ({categories})",
    "a vector-style drawing showing {subject} ({categories})",
    "an illustration of {subject} ({categories})",
    "a piece of clip art showing {subject} ({categories})",
    "a flat drawing of {subject} ({categories})",
    "a small sketch of {subject} ({categories})",
)

# File-name tokens that describe the picture; anything else (authors, Italian words) is noise.
MODIFIERS = {
    "bw": "black-and-white",
    "sleeping": "sleeping",
    "cartoon": "cartoon",
    "simple": "simple",
    "stylized": "stylized",
    "flying": "flying",
    "angry": "angry",
    "happy": "happy",
    "crazy": "crazy",
    "baby": "baby",
    "old": "old",
    "modern": "modern",
    "wooden": "wooden",
    "open": "open",
    "closed": "closed",
    "lit": "lit",
    "notlit": "unlit",
    "colour": "coloured",
    "color": "coloured",
    "red": "red",
    "blue": "blue",
    "green": "green",
    "yellow": "yellow",
    "orange": "orange",
    "purple": "purple",
    "pink": "pink",
    "white": "white",
    "black": "black",
    "grey": "grey",
    "seagreen": "sea-green",
    "chocolate": "chocolate",
    "vanilla": "vanilla",
}
MAX_MODIFIERS = 2


@dataclass(frozen=True)
class Group:
    """One fine category: where its files are, which file names belong, what they show.

    `noun` may use named groups of `pattern` (`{country}`); `article` says whether the subject
    takes "a"/"an" ("a kitten") or stands alone ("the flag of Austria").
    """

    folder: str
    pattern: str
    noun: str
    take: int
    article: bool = True


GROUPS: tuple[Group, ...] = (
    # animals
    Group("animals/mammals/housecats", r"kitten|gattina", "kitten", 2),
    Group("animals/mammals/housecats", r".", "cat", 5),
    Group("animals/mammals", r"^dog_0", "dog", 3),
    Group("animals/mammals/dogs", r".", "dog", 3),
    Group("animals/mammals/horses", r".", "horse", 5),
    Group("animals/mammals/big_cats", r"tig", "tiger", 5),
    Group("animals/mammals/big_cats", r"leone", "lion", 3),
    Group("animals/mammals/bears", r".", "bear", 5),
    Group("animals/mammals", r"elefant|elephant", "elephant", 4),
    Group("animals/mammals", r"monkey", "monkey", 3),
    Group("animals/dinosaurs", r".", "dinosaur", 5),
    Group("animals/bugs", r"butterfl|farfalla", "butterfly", 5),
    Group("animals/bugs", r"coccinell|ladybug", "ladybug", 4),
    Group("animals/bugs", r"^bee|abeille", "bee", 3),
    Group("animals/fish", r"fish|gourami|cichlid|greyling|loach|pescetto|bofish", "fish", 4),
    Group("animals/fish", r"dolphin", "dolphin", 3),
    Group("animals", r"^rana|frog", "frog", 4),
    Group("animals", r"lucert|lizard|ramarro", "lizard", 4),
    Group("animals/birds", r"acquila|aquila|eagle", "eagle", 4),
    Group("animals/birds", r"cign", "swan", 3),
    Group("animals/birds", r"duck", "duck", 2),
    Group("animals/birds", r"penguin|tux", "penguin", 4),
    # food and plants
    Group("food/fruit", r"^(an_|another_|cartoon_)?apple(?!_juice|_wedge)", "apple", 5),
    Group("food/fruit", r"banana", "banana", 2),
    Group("food/fruit", r"cherr", "cherry", 3),
    Group("food/fruit", r"grape", "bunch of grapes", 3),
    Group("food/desserts", r"^cone", "ice cream cone", 5),
    Group("food/desserts", r"cake|gateau|torta", "cake", 4),
    Group("food/desserts", r"^pie_", "pie", 4),
    Group("food/meats_and_eggs", r"burger", "hamburger", 4),
    Group("food/meats_and_eggs", r"egg", "fried egg", 3),
    Group("food/beverages", r"coffe|mug|tea|tazza|kubek", "cup of coffee or tea", 5),
    Group("food/breads_and_carbs", r"bread|croissant|muffin|pancake", "baked good", 4),
    Group("plants/flowers", r"flower|fiore|daisy|daffodil|rose|tulip", "flower", 5),
    Group("plants", r"tree|albero|arbre|palm", "tree", 4),
    Group("plants", r"mushroom|toadstool|champignon", "mushroom", 3),
    # everyday objects
    Group("signs_and_symbols/clocks", r"clock|orologio", "clock", 5),
    Group("electronics/bulb", r".", "light bulb", 5),
    Group("electronics/battery", r".", "battery", 3),
    Group("office/telephone", r".", "telephone", 5),
    Group("people/clothing/hats", r"hat|fedora|cap|sombrero", "hat", 5),
    Group("people/clothing/hats", r"crown", "crown", 2),
    Group("education/books", r"book|bible|libro", "book", 5),
    Group("buildings/homes", r"^home\d", "house", 4),
    Group("buildings/homes", r"house|casa", "house", 3),
    Group("computer/hardware", r"printer|stampante", "printer", 3),
    Group("computer/hardware", r"keyboard", "computer keyboard", 3),
    Group("computer/hardware", r"laptop|monitor|lcd|screen", "computer screen", 3),
    Group("computer/hardware", r"joystick", "joystick", 3),
    Group("computer/folders", r".", "folder icon", 4),
    Group("tools", r"magnif|lente", "magnifying glass", 4),
    Group("tools", r"hammer", "hammer", 3),
    # recreation
    Group("recreation/music", r"trumpet|tpt", "trumpet", 4),
    Group("recreation/music", r"guitar", "guitar", 4),
    Group("recreation/music", r"harp", "harp", 3),
    Group("recreation/music", r"45_rpm", "vinyl record", 4),
    Group("recreation/music", r"note|croche|quaver|clef", "musical note", 4),
    Group("recreation/sports", r"soccer|football_ball|baseball_|ball_jarno|ball_nicu", "ball", 5),
    Group("people/stickmen", r"^sm_", "stick figure", 4),
    Group("recreation/games/chess", r"^chesspieces-(?P<piece>\w+)", "chess {piece}", 4),
    Group("recreation/games/cards/simple", r"^simple_[hdcs]_", "playing card", 4),
    Group("recreation/toys", r"teddy", "teddy bear", 4),
    Group("recreation/toys", r"rubik", "Rubik's cube", 3),
    Group("recreation/party", r"^balloon-|^baloon", "balloon", 4),
    Group("recreation/party", r"fireworks", "fireworks display", 3),
    Group("recreation/holiday/valentines", r"heart", "heart", 4),
    Group("recreation/holiday/christmas", r"tree|evergreen", "Christmas tree", 3),
    # transportation
    Group("transportation/vehicles", r"^bus", "bus", 4),
    Group("transportation/vehicles", r"aircraft|airplane|plane", "airplane", 4),
    Group("transportation/vehicles", r"car|auto|chevrolet|skoda|cobra", "car", 4),
    Group("transportation/boating", r"^sailing_|sailboat", "sailing boat", 4),
    Group("transportation/roadsigns", r".", "road sign", 5),
    # signs, symbols and shapes
    Group(
        "signs_and_symbols/flags/europe",
        r"^(?P<country>[a-z]+(?:_[a-z]+)*)$",
        "the flag of {country}",
        6,
        article=False,
    ),
    Group(
        "signs_and_symbols/flags/america/united_states",
        r"^usa_(?P<state>[a-z_]+)$",
        "the state flag of {state}",
        4,
        article=False,
    ),
    Group("signs_and_symbols/weather", r"lightning", "lightning bolt", 4),
    Group("signs_and_symbols/weather", r"^sun|^sole", "sun", 3),
    Group("signs_and_symbols/weather", r"cloud", "cloud", 3),
    Group("geography/astronomy", r"moon", "moon phase", 4),
    Group("science/astronomy", r"jupiter|saturn|venus|mars", "planet", 3),
    # Stars with 30 or more points look like rings at 128 px.
    Group("shapes/stars", r"^star_(?P<points>[0-2]\d)pt", "{points}-pointed star", 5),
    Group("shapes/arrows", r"^arrow-", "arrow", 5),
    Group("shapes/jigsaw", r"^jigsaw", "jigsaw puzzle piece", 4),
    Group("people/smilies", r"^smiley\d", "smiley face", 4),
)


# Renders of drawings whose linked bitmap was missing: they show "Linked Image Not Found".
EXCLUDED = frozenset({"animals/birds/duck_yellow_ii_kurt_cagl_.png"})


@dataclass(frozen=True)
class Sample:
    """One chosen picture, ready to be written."""

    original_path: str
    caption: str
    jpeg: bytes
    width_px: int
    height_px: int


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the unpacked png directory")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args(argv)
    samples = select_samples(args.source)
    wanted = SHARD_COUNT * SAMPLES_PER_SHARD
    if len(samples) != wanted:
        print(f"selected {len(samples)} images, need {wanted}: adjust GROUPS", file=sys.stderr)
        return 1
    write_corpus(samples, args.output)
    total_bytes = sum(path.stat().st_size for path in args.output.iterdir())
    print(f"wrote {len(samples)} images to {args.output} ({total_bytes / 1e6:.2f} MB)")
    return 0


def select_samples(source_dir: Path) -> list[Sample]:
    """Walk `GROUPS` in order and return the chosen pictures, shuffled deterministically."""
    samples: list[Sample] = []
    used_paths: set[str] = set()
    used_content: set[str] = set()
    for group in GROUPS:
        chosen = _choose_from_group(source_dir, group, used_paths, used_content)
        if len(chosen) < group.take:
            print(f"{group.folder} /{group.pattern}/: only {len(chosen)} of {group.take}")
        samples += chosen
    random.Random(SHUFFLE_SEED).shuffle(samples)
    return samples


def _choose_from_group(
    source_dir: Path, group: Group, used_paths: set[str], used_content: set[str]
) -> list[Sample]:
    candidates = list(_matching_files(source_dir, group))
    chosen: list[Sample] = []
    # Walk the candidates in an order spread over the whole list so a group of similar names
    # (star_05..star_28) is sampled across its range, not from its start.
    for index in _spread_order(len(candidates)):
        if len(chosen) == group.take:
            break
        path, match = candidates[index]
        relative = path.relative_to(source_dir).as_posix()
        content_hash = hashlib.sha256(path.read_bytes()).hexdigest()
        if relative in used_paths or relative in EXCLUDED or content_hash in used_content:
            continue
        picture = _prepare(path)
        if picture is None:
            continue
        used_paths.add(relative)
        used_content.add(content_hash)
        chosen.append(_sample(relative, picture, group, match))
    return chosen


def _matching_files(source_dir: Path, group: Group) -> Iterator[tuple[Path, re.Match[str]]]:
    pattern = re.compile(group.pattern)
    for path in sorted((source_dir / group.folder).glob("*.png")):
        match = pattern.search(path.stem)
        if match is not None:
            yield path, match


def _spread_order(count: int) -> list[int]:
    """Indices 0..count-1 ordered by bisection: 0, mid, quarter points, ... (deterministic)."""
    order: list[int] = []
    seen: set[int] = set()
    step = count
    while step >= 1 and len(order) < count:
        for index in range(0, count, step):
            if index not in seen:
                seen.add(index)
                order.append(index)
        step //= 2
    return order + [index for index in range(count) if index not in seen]


def _prepare(path: Path) -> Image.Image | None:
    """The picture on white, trimmed and shrunk to MAX_SIDE_PX, or None when it is unfit."""
    with Image.open(path) as source:
        width_px, height_px = source.size
        if (
            min(width_px, height_px) < MIN_SOURCE_SIDE_PX
            or max(width_px, height_px) < MIN_SOURCE_LONG_SIDE_PX
            or width_px * height_px > MAX_SOURCE_PIXELS
        ):
            return None
        rgba = source.convert("RGBA")
    picture = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    picture = _trimmed(picture)
    if picture is None:
        return None
    picture.thumbnail((MAX_SIDE_PX, MAX_SIDE_PX), Image.Resampling.LANCZOS)
    pixels = np.asarray(picture, dtype=np.float32)
    ink_fraction = float((pixels.min(axis=2) < INK_THRESHOLD).mean())
    if ink_fraction < MIN_INK_FRACTION or float(pixels.std()) < MIN_PIXEL_STD:
        return None
    return picture


def _trimmed(picture: Image.Image) -> Image.Image | None:
    """Crop away the empty white margin (many drawings sit small on a big canvas)."""
    ink = np.asarray(picture).min(axis=2) < INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    margin_px = round(TRIM_MARGIN_FRACTION * max(bottom - top, right - left))
    box = (
        max(left - margin_px, 0),
        max(top - margin_px, 0),
        min(right + margin_px, picture.width),
        min(bottom + margin_px, picture.height),
    )
    width_px, height_px = box[2] - box[0], box[3] - box[1]
    if (
        min(width_px, height_px) < MIN_DRAWING_SIDE_PX
        or max(width_px, height_px) < MIN_DRAWING_LONG_SIDE_PX
        or max(width_px, height_px) / min(width_px, height_px) > MAX_ASPECT_RATIO
    ):
        return None
    return picture.crop(box)


def _sample(relative: str, picture: Image.Image, group: Group, match: re.Match[str]) -> Sample:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return Sample(
        original_path=relative,
        caption=make_caption(relative, group, match),
        jpeg=buffer.getvalue(),
        width_px=picture.width,
        height_px=picture.height,
    )


def make_caption(relative: str, group: Group, match: re.Match[str]) -> str:
    """A caption from the file's path: its subject, a few descriptive words, its categories."""
    parts = relative.split("/")
    # crc32 of the path, unlike hash(), is the same in every run and on every machine.
    phrasing = PHRASINGS[zlib.crc32(relative.encode()) % len(PHRASINGS)]
    named = {name: value.replace("_", " ") for name, value in match.groupdict().items() if value}
    noun = group.noun.format(**{name: _titled(value, group) for name, value in named.items()})
    modifiers = [word for word in _modifiers(parts[-1], noun) if word not in phrasing]
    subject = " ".join([*modifiers, noun])
    if group.article:
        subject = ("an " if subject[0].lower() in "aeiou" else "a ") + subject
    categories = ", ".join(part.replace("_", " ").replace("-", " ") for part in parts[:-1])
    return phrasing.format(subject=subject, categories=categories)


def _titled(value: str, group: Group) -> str:
    # Place names read as proper nouns; counts and chess pieces stay as they are.
    return value.title() if not group.article else value


def _modifiers(file_name: str, noun: str) -> list[str]:
    stem = file_name.removesuffix(".png").lower()
    stem = stem.replace("black_and_white", "bw").replace("b_w", "bw")
    words: list[str] = []
    for token in re.split(r"[^a-z]+", stem):
        word = MODIFIERS.get(token)
        if word and word not in words and word not in noun:
            words.append(word)
    return words[:MAX_MODIFIERS]


def write_corpus(samples: list[Sample], output_dir: Path) -> None:
    """Write the shards, the manifest and the licence note into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("*.tar"):
        stale.unlink()
    manifest_lines: list[str] = []
    for shard_index in range(SHARD_COUNT):
        shard_name = f"{shard_index:05d}"
        start = shard_index * SAMPLES_PER_SHARD
        shard = samples[start : start + SAMPLES_PER_SHARD]
        with tarfile.open(
            output_dir / f"{shard_name}.tar", "w", format=tarfile.USTAR_FORMAT
        ) as tar:
            for position, sample in enumerate(shard):
                key = f"{shard_name}{position:0{KEY_SAMPLE_DIGITS}d}"
                _write_sample(tar, key, sample)
                manifest_lines.append(
                    json.dumps(
                        {
                            "shard": shard_name,
                            "key": key,
                            "caption": sample.caption,
                            "original_path": sample.original_path,
                        }
                    )
                )
    (output_dir / "manifest.jsonl").write_text("\n".join(manifest_lines) + "\n")
    (output_dir / "LICENSE-openclipart.txt").write_text(LICENSE_TEXT)


def _write_sample(tar: tarfile.TarFile, key: str, sample: Sample) -> None:
    metadata = {
        "key": key,
        "caption": sample.caption,
        "width": sample.width_px,
        "height": sample.height_px,
        "original_path": sample.original_path,
    }
    _add_member(tar, f"{key}.jpg", sample.jpeg)
    _add_member(tar, f"{key}.txt", sample.caption.encode())
    _add_member(tar, f"{key}.json", json.dumps(metadata).encode())


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    sys.exit(main())
