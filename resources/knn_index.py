"""The faiss index used for the KNN graphs."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from megapairs_assets.knn.search import IndexSpec, faiss_has_gpu


class FaissIndexResource(dg.ConfigurableResource):
    """Index type and neighbour count for the KNN graphs.

    Exact inner product (`flat`) is the default: on unit vectors it is exact cosine KNN and
    fits one H100 at paper scale. `ivf` and `hnsw` trade recall for speed on larger corpora.
    `use_gpu="auto"` moves the index to the GPU when faiss was built with GPU support and a
    GPU is visible.
    """

    k: int = Field(default=50, description="Neighbours kept per query (self excluded)")
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int | None = Field(default=None, description="ivf lists; None = about 4*sqrt(N)")
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    query_batch_size: int = 16384
    backend: Literal["auto", "faiss", "torch"] = Field(
        default="auto",
        description="auto: faiss on a GPU when faiss can use one, else exact torch search on "
        "a visible CUDA GPU, else faiss on the CPU",
    )
    torch_block_bytes: int | None = Field(
        default=None, description="torch backend: bytes of one score block (None: from free memory)"
    )
    allow_partial_corpus: bool = Field(
        default=False,
        description="Search a corpus with shards still missing embeddings (the check "
        "knn_corpus_complete then passes, saying so); off by default",
    )
    reuse_unchanged: bool = Field(
        default=True,
        description="Keep a shard's graph when the corpus, its query shard and the settings are "
        "unchanged (a key in the table's footer); false searches every shard again",
    )

    def spec(self) -> IndexSpec:
        use_gpu = self.use_gpu == "yes" or (self.use_gpu == "auto" and faiss_has_gpu())
        return IndexSpec(
            kind=self.kind,
            nlist=self.nlist,
            nprobe=self.nprobe,
            hnsw_m=self.hnsw_m,
            ef_search=self.ef_search,
            use_gpu=use_gpu,
            query_batch_size=self.query_batch_size,
            backend=self.backend,
            torch_block_bytes=self.torch_block_bytes,
        )
