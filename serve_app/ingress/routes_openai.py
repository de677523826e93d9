"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

For an expert model the response's ``atelier`` object also holds ``expert_key``,
``expert_version``, ``privacy`` (that version's DP ledger: ``dp``, ε, δ, accountant,
``secure_rng``, ...) and ``prediction`` (label, answer token, class probabilities at the last
slot); streams send the first three in the first chunk and the prediction in the final one.
``GET /v1/models`` lists each expert's ``privacy`` too.

``model="auto"`` responses explain the choice in ``atelier.routing`` (scores, threshold, what
matched, pool rule); ``POST /v1/feedback`` with such a response's id and the right model (or a
thumbs up/down) teaches the tenant's router (:mod:`serve_app.ingress.routing.feedback`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from ray.serve.exceptions import BackPressureError

from cluster.registry import Principal
from serve_app.ingress.auth import principal
from serve_app.ingress.catalog import Target, apply_feedback
from serve_app.ingress.limits import check_request, replica_refusal
from serve_app.ingress.openai_api import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    TextChoice,
    TextCompletion,
    Usage,
    bad_request,
    new_id,
    now,
)
from serve_app.ingress.retry import call_with_retry
from serve_app.ingress.routing.feedback import Decision, FeedbackRequest
from serve_app.ingress.state import RouterState, get_state
from serve_app.wire import GenerationEvent, GenerationRequest, GenerationResult, ReplicaError

api = APIRouter()


@api.get("/v1/models", response_model=ModelList)
async def list_models(who: Principal = Depends(principal), state: RouterState = Depends(get_state)) -> ModelList:
    """``base``, ``auto`` and the caller's own customizations (admins see every tenant's)."""
    cards = [ModelCard(id="base", owned_by="atelier", atelier={"kind": "base", "pools": [p.name for p in state.config.pools]}),
             ModelCard(id="auto", owned_by="atelier", atelier={"kind": "auto", "method": state.config.routing.method})]
    for c in await asyncio.to_thread(state.catalog.visible, who):
        cards.append(ModelCard(id=c.model_id, owned_by=c.tenant,
                               atelier={"kind": c.kind, "version": c.version, "pools": list(c.pools),
                                        "description": c.description, **c.extra}))
    return ModelList(data=cards)


@api.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, who: Principal = Depends(principal),
                           state: RouterState = Depends(get_state)):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    return await _serve(state, who, body, "chat", last_user, messages=messages)


@api.post("/v1/completions")
async def completions(body: CompletionRequest, who: Principal = Depends(principal),
                      state: RouterState = Depends(get_state)):
    if body.echo:
        raise bad_request("echo=true is not supported", "echo")
    return await _serve(state, who, body, "completion", body.prompt_text(), prompt=body.prompt_text())


@api.post("/v1/feedback")
async def feedback(body: FeedbackRequest, who: Principal = Depends(principal),
                   state: RouterState = Depends(get_state)) -> dict:
    """Which customization was right for a ``model="auto"`` response (or thumbs up/down); the
    tenant's router follows it for prompts this alike from then on."""
    return await asyncio.to_thread(apply_feedback, state.catalog, who, body)


async def _serve(state: RouterState, who: Principal, body, endpoint: str, route_text: str, **content):
    started = time.perf_counter()
    check_request(body, endpoint)
    response_id = new_id("chatcmpl" if endpoint == "chat" else "cmpl")
    target: Target = await asyncio.to_thread(state.catalog.resolve, who, body.model, route_text, body.atelier)
    if target.routing and target.routing.get("auto") and who.tenant:  # feedback may name this response
        state.catalog.feedback.record(Decision(id=response_id, tenant=who.tenant, prompt=route_text,
                                               chosen=target.model_id))
    pool = state.config.pool(target.pool)
    max_tokens = body.token_limit(min(256, pool.max_new_tokens))
    if max_tokens > pool.max_new_tokens:
        raise bad_request(f"max_tokens {max_tokens} exceeds this pool's limit of {pool.max_new_tokens}", "max_tokens")
    req = GenerationRequest(request_id=new_id("req"), max_tokens=max_tokens, temperature=body.temperature,
                            top_p=body.top_p, seed=body.seed, stop=body.stop_list(), adapter=target.adapter,
                            expert=target.expert_key, tenant=who.tenant or "admin", model=target.model_id, **content)
    handle = state.pools[target.pool]
    if target.expert_key:
        handle = handle.options(multiplexed_model_id=target.expert_key)
    tags = {"tenant": req.tenant, "model": target.model_id, "endpoint": endpoint}
    info = {"model": target.model_id, "kind": target.kind, "pool": target.pool, "routing": target.routing}
    if target.expert_key:  # ties the answer to one expert version and its DP ledger
        info.update(expert_key=target.expert_key, expert_version=target.expert_version, privacy=target.privacy)
    if body.stream:
        return StreamingResponse(_gated_sse(state, handle, endpoint, req, info, tags, started, response_id, target.pool),
                                 media_type="text/event-stream")
    release = await state.gate.enter(req.tenant)
    sent = time.perf_counter()
    try:
        result: GenerationResult = await call_with_retry(lambda: handle.generate.remote(req), f"pool {target.pool!r}")
    except BackPressureError:
        raise OpenAIError(503, f"pool {target.pool!r} is at capacity; retry shortly", type_="overloaded") from None
    finally:
        release()
    if result.error is not None:
        raise replica_error(state, tags, result.error)
    state.catalog.latency.observe(target.pool, time.perf_counter() - sent)  # for atelier.max_latency_ms
    record_success(state, tags, started, status=200, completion_tokens=result.completion_tokens,
                   prompt_tokens=result.prompt_tokens)
    if result.prediction is not None:
        info["prediction"] = result.prediction.model_dump()
    usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                  total_tokens=result.prompt_tokens + result.completion_tokens)
    if endpoint == "chat":
        return ChatCompletion(id=response_id, created=now(), model=target.model_id, usage=usage, atelier=info,
                              choices=[Choice(message={"role": "assistant", "content": result.text},
                                              finish_reason=result.finish_reason or "stop")])
    return TextCompletion(id=response_id, created=now(), model=target.model_id, usage=usage, atelier=info,
                          choices=[TextChoice(text=result.text, finish_reason=result.finish_reason or "stop")])


async def _gated_sse(state: RouterState, handle, endpoint: str, req: GenerationRequest, info: dict, tags: dict,
                     started: float, chunk_id: str, pool: str) -> AsyncIterator[str]:
    """The stream, holding one of the tenant's in-flight slots (:class:`TenantGate`) from the pool call
    to its last event; a stream the client never reads never takes a slot."""
    try:
        release = await state.gate.enter(req.tenant)
    except OpenAIError as exc:  # the response has started: the refusal is the stream's only event
        yield "data: " + json.dumps(exc.body()) + "\n\n"
        yield "data: [DONE]\n\n"
        return
    try:
        gen = handle.options(stream=True).generate_stream.remote(req)
        async for text in _sse(state, gen, endpoint, req, info, tags, started, chunk_id, pool):
            yield text
    finally:
        release()


async def _sse(state: RouterState, gen, endpoint: str, req: GenerationRequest, info: dict, tags: dict,
               started: float, chunk_id: str, pool: str) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    created, sent = now(), time.perf_counter()
    obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False, **extra) -> str:
        if endpoint == "chat":
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": chunk_id, "object": obj, "created": created, "model": req.model,
                                      "choices": [choice], **extra}) + "\n\n"

    yield chunk("", None, first=True, atelier=info)
    try:
        event: GenerationEvent
        async for event in gen:
            if event.error is not None:
                err = replica_error(state, tags, event.error)
                yield "data: " + json.dumps(err.body()) + "\n\n"
                break
            if event.text or event.finish_reason:
                extra = {}
                if event.finish_reason:
                    if event.prediction is not None:
                        extra["atelier"] = {"prediction": event.prediction.model_dump()}
                    extra["usage"] = {"prompt_tokens": event.prompt_tokens,
                                      "completion_tokens": event.completion_tokens,
                                      "total_tokens": event.prompt_tokens + event.completion_tokens}
                    state.catalog.latency.observe(pool, time.perf_counter() - sent)
                    record_success(state, tags, started, status=200, completion_tokens=event.completion_tokens,
                                   prompt_tokens=event.prompt_tokens)
                yield chunk(event.text, event.finish_reason, **extra)
    except BackPressureError:
        yield "data: " + json.dumps(OpenAIError(503, "pool at capacity; retry shortly", "overloaded").body()) + "\n\n"
    yield "data: [DONE]\n\n"


def replica_error(state: RouterState, tags: dict, error: ReplicaError) -> OpenAIError:
    """The OpenAI error for a replica's error, counted in the error metric."""
    if state.metrics is not None:
        state.metrics.errors.inc(tags={**tags, "status": str(error.status)})
    return replica_refusal(error.status, error.message, tags.get("endpoint", ""))


def record_success(state: RouterState, tags: dict, started: float, status: int, completion_tokens: int = 0,
                   prompt_tokens: int = 0) -> None:
    m = state.metrics
    if m is None:
        return
    m.requests.inc(tags={**tags, "status": str(status)})
    for counter, n in ((m.tokens, completion_tokens), (m.prompt_tokens, prompt_tokens)):
        if n:  # Ray counters refuse inc(0)
            counter.inc(n, tags=tags)
    m.latency.observe(time.perf_counter() - started, tags=tags)
