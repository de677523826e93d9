"""``POST /v1/experts/{tenant}/{name}/predict``: a Llamdex expert's class answer to one question.

The question is answered exactly as in training (the connectors' system prompt + the question,
slots appended, one forward): the label is the class answer token with the highest probability
at the last slot. The response also carries what the encoder read from the question (decoded
features), which features the question stated and which it did not (those get the schema's
default, or 'missing' for a category: never a value made up by the model), the tenant expert's own
probabilities on the features, the versions used and the expert version's DP ledger (``privacy``).
Same keys, isolation and errors as the chat API; concurrent predictions are batched on the
replica into one forward (even across experts).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.exceptions import BackPressureError

from cluster.registry import Principal
from serve_app.ingress.auth import check_tenant_access, principal
from serve_app.ingress.openai_api import OpenAIError, RoutingHints, new_id, now
from serve_app.ingress.retry import call_with_retry
from serve_app.ingress.routes_openai import record_success, replica_error
from serve_app.ingress.state import RouterState, get_state
from serve_app.wire import PredictCall, PredictReply, ReplicaError

api = APIRouter()


class PredictRequest(BaseModel):
    """Body of a predict call."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=20_000, description="the question, in natural language")
    atelier: RoutingHints | None = None


class ExpertVersions(BaseModel):
    expert: int
    connectors: int
    key: str = Field(description="multiplexed id: <tenant>/<name>@e<expert version>.c<connectors version>")


class PredictUsage(BaseModel):
    prompt_tokens: int


class PredictResponse(BaseModel):
    """The expert's answer to one question."""

    id: str
    object: Literal["expert.prediction"] = "expert.prediction"
    created: int
    model: str
    label: str = Field(description="argmax class of the LLM's answer tokens at the last slot")
    probabilities: dict[str, float] = Field(description="softmax over the class answer tokens")
    features: dict[str, Any] = Field(description="what the encoder read from the question (None = not stated)")
    stated: list[str] = Field(default_factory=list, description="features the question states (read from it)")
    not_stated: list[str] = Field(default_factory=list, description="features the question does not state: the "
                                  "expert got the schema's default (numeric/bool) or 'missing' (category)")
    read_by_meaning: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "stated categories read from the user's own words by the meaning reader (llamdex.meaning): the value, "
        "the clause it was read from and its cosine similarity; the torch engine reports them, vLLM pools do not"))
    expert_probabilities: dict[str, float] = Field(description="the tenant expert's output on those features")
    versions: ExpertVersions
    privacy: dict | None = Field(None, description="the DP ledger of this expert version (dp, epsilon, delta, "
                                                   "accountant, secure_rng, ...); null if unreadable")
    pool: str
    usage: PredictUsage
    atelier: dict = Field(default_factory=dict)


@api.post("/v1/experts/{tenant}/{name}/predict", response_model=PredictResponse)
async def predict(tenant: str, name: str, body: PredictRequest, who: Principal = Depends(principal),
                  state: RouterState = Depends(get_state)) -> PredictResponse:
    started = time.perf_counter()
    check_tenant_access(who, tenant)
    model = f"{tenant}/{name}"
    target = await asyncio.to_thread(state.catalog.resolve, who, model, body.question, body.atelier)
    if target.kind != "expert":
        raise OpenAIError(400, f"{model} is an {target.kind}, not an expert; predict serves Llamdex experts "
                               "(use /v1/chat/completions for adapters)", param="name")
    tags = {"tenant": who.tenant or "admin", "model": model, "endpoint": "predict"}
    handle = state.pools[target.pool].options(multiplexed_model_id=target.expert_key)
    release = await state.gate.enter(tags["tenant"])
    try:
        reply: PredictReply = await call_with_retry(
            lambda: handle.predict.remote(PredictCall(expert=target.expert_key, question=body.question)),
            f"pool {target.pool!r}")
    except BackPressureError:
        raise OpenAIError(503, f"pool {target.pool!r} is at capacity; retry shortly", type_="overloaded") from None
    finally:
        release()
    if reply.error is not None or reply.result is None:
        raise replica_error(state, tags, reply.error or ReplicaError(message="empty prediction"))
    result = reply.result
    record_success(state, tags, started, status=200, prompt_tokens=result.prompt_tokens)
    return PredictResponse(
        id=new_id("pred"), created=now(), model=model, label=result.label,
        probabilities=result.probabilities, features=result.features,
        stated=result.stated, not_stated=result.not_stated, read_by_meaning=result.read_by_meaning,
        expert_probabilities=result.expert_probabilities,
        versions=ExpertVersions(expert=result.expert_version, connectors=result.connectors_version,
                                key=result.expert_key),
        privacy=target.privacy if target.expert_key == result.expert_key else None,
        pool=target.pool, usage=PredictUsage(prompt_tokens=result.prompt_tokens),
        atelier={"batch_rows": result.batch_rows, "layer": result.layer, "num_slots": result.num_slots,
                 "routing": target.routing})
