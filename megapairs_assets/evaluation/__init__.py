"""Evaluation: composed-image-retrieval benchmark scores for a retriever.

Plain logic (no Dagster): `metrics` (the official definitions, numpy only), `loaders` (CIRCO,
CIRR, FashionIQ, GeneCIS from their official files), `heldout` (our own benchmark from the
project's triplets, and the split training must share), `scoring` (top-k), `gallery_cache`
(gallery embeddings computed once per retriever, benchmark and gallery version),
`submissions` (server files), `run` (one benchmark for one retriever, end to end) and `cli`
(`megapairs eval`). `assets.py` is the Dagster edge.
"""
