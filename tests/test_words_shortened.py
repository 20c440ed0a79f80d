"""A cut error line says it was cut (status printed "...or check that ;" before)."""

from megapairs_assets.lib.words import shortened


def test_a_cut_text_ends_in_an_ellipsis_and_a_short_one_is_kept() -> None:
    text = "shard 00002 has no caption_text_embeddings table: materialize it first, or check that"
    assert shortened(text, 200) == text
    cut = shortened(text, 40)
    assert len(cut) <= 40 and cut.endswith("…") and text.startswith(cut[:-1])
