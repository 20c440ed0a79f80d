"""The describe step keeps its model sample when a shard's pairs change (a shard added).

Adding a shard changes an old shard's mined pairs: targets in the new shard displace some old
ones and new pairs arrive. What is proved, with a real chat server: pairs that arrive ranked
below the sampled ones do not displace them (no request is sent again), and a sampled pair
that leaves frees only its own place, which the lowest-ranked other pair takes (one request).
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world, write_pairs

from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.prompts import keyed_u64
from megapairs_assets.generation.settings import PairSample
from megapairs_assets.mining.pairs import pair_id_for


def _rank(pair_id: str, seed: int) -> int:
    return keyed_u64(seed, "model_sample", pair_id)


def _model_pairs(world, shard: str) -> set[str]:
    table = pl.read_parquet(world.layout.shard_table("pair_descriptions", shard))
    return set(table.filter(pl.col("backend") != "heuristic")["pair_id"].to_list())


def test_new_pairs_do_not_displace_the_sample_and_a_leaving_pair_frees_one_place(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(12,), images_per_shard=12)
    own = [i for i in world.image_ids if i.startswith("00000/")]
    first_pairs = [(own[n], own[(n + 5) % 12], [own[n]]) for n in range(12)]
    write_pairs(world.layout, world.catalog, "00000", first_pairs)
    with ChatServer() as server:
        settings = replace(
            http_settings(server.base_url),
            model_sample=PairSample(fraction=1.0, max_pairs_per_shard=2),
            heuristic_fill=True,
        )

        def describe() -> int:
            result = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
            return result.metadata["model_calls"]

        assert describe() == 2
        sampled = _model_pairs(world, "00000")
        lowest = min(_rank(p, settings.seed) for p in sampled)

        # New pairs (other targets of the same queries) ranked below both sampled pairs.
        candidates = [(q, t) for q in own for t in own if q != t]
        below = [
            (q, t, [q])
            for q, t in candidates
            if _rank(pair_id_for(q, t), settings.seed) < lowest
            and (q, t) not in {(a, b) for a, b, _ in first_pairs}
        ][:2]
        assert below, "some other pair of 132 ranks below the sampled two"
        write_pairs(world.layout, world.catalog, "00000", [*first_pairs, *below])
        assert describe() == 0
        assert _model_pairs(world, "00000") == sampled

        # One sampled pair leaves: only its place is filled, by the lowest-ranked newcomer.
        gone = min(sampled, key=lambda p: _rank(p, settings.seed))
        remaining = [p for p in [*first_pairs, *below] if pair_id_for(p[0], p[1]) != gone]
        write_pairs(world.layout, world.catalog, "00000", remaining)
        assert describe() == 1
        now = _model_pairs(world, "00000")
        assert sampled - {gone} <= now and gone not in now and len(now) == 2
        newcomer = (now - sampled).pop()
        assert newcomer == min(
            (pair_id_for(q, t) for q, t, _ in remaining if pair_id_for(q, t) not in sampled),
            key=lambda p: _rank(p, settings.seed),
        )
