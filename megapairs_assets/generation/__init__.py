"""Generation: pair descriptions (MLLM), retrieval instructions (LLM) and triplets.

Plain logic lives in the modules beside this file and imports no Dagster:
`prompts` (versioned templates and the few-shot pool), `parsing` (list extraction, filters,
rejection codes), `store` (per-shard response cache), `runner` (cache-first request loop),
`backends/` (one interface, a registry by name), `describe` / `instruct` / `triplets` (the
per-shard stage functions) and `export` (release folder and dataset card). `assets.py` holds
the Dagster declarations. `vllm_worker` runs in vLLM's own environment only.

This package's `__init__` stays import-free on purpose: the vLLM worker is started as
`python -m megapairs_assets.generation.vllm_worker` in an environment without our deps.
"""
