"""Evaluation: composed-image-retrieval benchmark scores for a retriever.

Plain logic (no Dagster):
- `metrics`: the official metric definitions (numpy only).
- `benchmark`: what a loaded split is; `loaders/`: CIRCO, CIRR, FashionIQ, GeneCIS from their
  official files; `heldout`: our own benchmark from the project's triplets, and the split
  training must share; `images`: opening (and GeneCIS-cropping) benchmark images.
- `scoring`: top-k with faiss; `gallery_cache`: gallery embeddings computed once per retriever
  weights, gallery and images version; `submissions`: the CIRCO / CIRR server files.
- `run`: one benchmark for one retriever, end to end; `step`: one `benchmark_scores`
  partition as a `StepResult`; `catalog_rows`: the scores as catalog rows; `plot`: base vs
  trained per metric.

Dagster edge: `assets` (the asset, its partitions, the checkpoint sensor), `resource` (the
settings, to move to `resources/`). `cli`: the `megapairs eval` subcommand.
"""
