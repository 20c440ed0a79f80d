"""The per-shard model sample under a changing pair set (a shard added to the corpus).

Adding a shard changes an old shard's mined pairs: some targets are displaced by better
neighbours in the new shard (those pairs leave), and new pairs arrive. What is proved: given the
previous sample, a capped sample keeps every member that is still a pair, fills only the places
of members that left (lowest-ranked first), respects the fraction and a lowered cap, and is the
plain lowest-ranked sample without a previous one; without `keep`, newcomers displace members
that are still there (the behaviour `keep` removes).
"""

from __future__ import annotations

import itertools

from megapairs_assets.generation.prompts import keyed_u64
from megapairs_assets.generation.settings import PairSample

SEED = 0


def _rank(pair_id: str) -> int:
    return keyed_u64(SEED, "model_sample", pair_id)


def _shard_grows(sample: PairSample, old: list[str]) -> tuple[set[str], list[str]]:
    """The old sample, and the shard's pairs after a shard is added: the pair ranked just after
    the sample leaves, one sampled pair stays, and newcomers rank below every old pair."""
    previous = sample.select(old, SEED)
    lowest_old = min(_rank(p) for p in old)
    # About one id in 200 ranks below all 200 old pairs; the first three found are the arrivals.
    newcomers = (f"new-{i}" for i in itertools.count())
    displacing = list(itertools.islice((p for p in newcomers if _rank(p) < lowest_old), 3))
    return previous, [*old, *displacing]


def test_members_that_are_still_pairs_stay_when_lower_ranked_pairs_arrive():
    sample = PairSample(fraction=1.0, max_pairs_per_shard=2)
    old = [f"old-{i}" for i in range(200)]
    previous, grown = _shard_grows(sample, old)

    # Without the previous sample, the newcomers take both places (the instability).
    assert sample.select(grown, SEED).isdisjoint(previous)
    # With it, nothing moves: both members are still pairs of the shard.
    assert sample.select(grown, SEED, keep=previous) == previous


def test_only_the_place_of_a_member_that_left_is_filled_lowest_ranked_first():
    sample = PairSample(fraction=1.0, max_pairs_per_shard=2)
    old = [f"old-{i}" for i in range(200)]
    previous, grown = _shard_grows(sample, old)
    gone, stays = sorted(previous, key=_rank)
    now = [p for p in grown if p != gone]

    chosen = sample.select(now, SEED, keep=previous)

    lowest_other = min((p for p in now if p != stays), key=_rank)
    assert chosen == {stays, lowest_other}
    assert lowest_other.startswith("new-")


def test_keep_respects_the_fraction_and_a_lowered_cap():
    old = [f"old-{i}" for i in range(200)]
    previous = PairSample(fraction=1.0, max_pairs_per_shard=5).select(old, SEED)

    lowered = PairSample(fraction=1.0, max_pairs_per_shard=2).select(old, SEED, keep=previous)
    assert lowered == set(sorted(previous, key=_rank)[:2])

    # A member above a new, smaller fraction leaves the sample whatever `keep` says: with the
    # fraction cut between the second and third members' ranks, only those two qualify.
    by_rank = sorted(previous, key=_rank)
    cut = (_rank(by_rank[1]) + _rank(by_rank[2])) / 2
    narrow = PairSample(fraction=cut / 2.0**64, max_pairs_per_shard=5)
    assert narrow.select(old, SEED, keep=previous) == set(by_rank[:2])


def test_keep_without_a_cap_changes_nothing_and_unknown_ids_are_ignored():
    ids = [f"p{i}" for i in range(100)]
    half = PairSample(fraction=0.5)
    assert half.select(ids, SEED, keep=["p1", "p2", "gone"]) == half.select(ids, SEED)
    capped = PairSample(fraction=1.0, max_pairs_per_shard=3)
    assert capped.select(ids, SEED, keep=["gone"]) == capped.select(ids, SEED)
    assert "gone" not in capped.select(ids, SEED, keep=["gone"])
