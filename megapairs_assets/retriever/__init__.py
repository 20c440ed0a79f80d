"""Retrievers: a CLIP model (base open_clip or a trained MMRet checkpoint) as image embeddings
and fused multimodal query embeddings (method.md §7).

`fusion.py` holds the one fusion rule; `model.py` the `Retriever`, `RetrieverSpec` (its stable
`retriever_id`) and `load_retriever`.
"""
