"""The replica half of the Serve app: one ``LLMReplica`` deployment per model pool.

    deployment      LLMReplica: loads the pool's base model and engine, the bank, the expert LRU
    engine_api      the one contract every engine implements (generate, swap bank, capabilities)
    engine_torch    the torch engine: continuous batching, chunked prefill, per-row modifiers
    engine_vllm     the vLLM engine (base + adapters)
    modifiers       per-row modifiers: an adapter of the bank, a Llamdex expert spliced in at layer k
    expert_runtime  expert keys, loading bundles from the registry, LRU statistics, batched predict
    rows            one generating row of the torch engine (sampling, stops, streaming)
    scheduler       fair admission across tenants, KV slot table, prefill planning
    kv_slots        per-row KV cache slots and the attention that reads them
    detok           incremental detokenisation for streaming

It answers the router with the typed payloads of :mod:`serve_app.wire`.
"""
