"""The ingress half of the Serve app: the ``Router`` deployment (FastAPI) in front of the pools.

    router          the Router deployment: FastAPI app, error handlers, the routes below
    routes_openai   POST /v1/chat/completions, /v1/completions, GET /v1/models, POST /v1/feedback
    routes_experts  POST /v1/experts/<tenant>/<name>/predict
    routes_manage   tenant/admin API: uploads (schemas, experts, adapters), listings, keys, refits
    auth            Bearer keys -> a Principal (tenant or admin) and its scope checks
    catalog         what a caller may use, resolving ``model`` to a Target (pool, expert key), ``auto``
    routing/        ``model="auto"``: profiles, embedders, recommender, feedback memory, pool choice
    state           the router process's state (config, registry, catalog, pool handles, metrics)
    openai_api      OpenAI wire models (requests, responses, errors)
    limits          per-request limits and the 4xx that name the field
    body_limit      request body size guard
    retry           re-send to another replica when one is lost

It talks to the replicas only through the typed payloads of :mod:`serve_app.wire`.
"""
