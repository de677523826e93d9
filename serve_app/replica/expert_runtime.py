"""Llamdex experts on a replica: multiplexed keys, loading, the insertion prefill hook, prediction.

**Key** (Serve's multiplexed model id): ``<tenant>/<name>@e<expert version>.c<connectors version>``,
e.g. ``acme/survival@e2.c1``. It pins both artifacts, so re-publishing either one gives a new
key: the router's next request names the new versions, Serve routes it like any new model, and
the replica loads the new pair while the old one ages out of the LRU.

**Loading**: both versions are materialised from the registry and passed to
:func:`llamdex.insertion.load_bundle`, which refuses connectors built for another base model
(content hash) and experts that do not fit the connectors' schema; the replica answers 422
naming the field. A :class:`LoadedExpert` is what the LRU holds; eviction drops its bundle.

**Generation** (chat/completions to an expert model): the row's prompt is exactly the prompt the
connectors were trained on (:func:`llamdex.prompting.chat_prompt_ids`: the connectors' system
prompt + the *last user message*; earlier turns and client system prompts are not used), the
expert slots are appended and overwritten at layer k, the first generated token is the class
answer token with the highest probability at the last slot (the prediction, whatever the sampling
settings), and decoding then continues freely from the slots with the KV cache. The engine does
this through :class:`serve_app.replica.modifiers.ExpertModifier`; base, adapter and expert rows share
the running batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.logs import get_logger
from cluster.models import ResolvedModel
from cluster.registry import NotFound, Registry
from serve_app.wire import EngineError, GenerationRequest

log = get_logger("experts")

KEY_PATTERN = re.compile(r"^(?P<tenant>[a-z][a-z0-9-]{1,38})/(?P<name>[a-z][a-z0-9_-]{0,63})"
                         r"@e(?P<expert>[0-9]+)\.c(?P<connectors>[0-9]+)$")


@dataclass(frozen=True)
class ExpertKey:
    """The multiplexed id of one (expert version, connectors version) pair."""

    tenant: str
    name: str
    expert_version: int
    connectors_version: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}@e{self.expert_version}.c{self.connectors_version}"

    @property
    def model_id(self) -> str:
        return f"{self.tenant}/{self.name}"

    @classmethod
    def parse(cls, key: str) -> ExpertKey:
        m = KEY_PATTERN.match(key or "")
        if m is None:
            raise EngineError(400, f"expert key {key!r} is malformed; expected "
                                   "'<tenant>/<name>@e<expert version>.c<connectors version>'")
        return cls(m["tenant"], m["name"], int(m["expert"]), int(m["connectors"]))


class LoadedExpert:
    """What the multiplexed LRU holds for one key. Serve calls ``__del__`` on eviction (and the
    garbage collector may call it again): it drops the bundle, so the weights are freed as soon
    as no running row still uses them."""

    def __init__(self, key: ExpertKey, bundle, seconds: float, on_evict: Callable[[str], None]):
        self.key, self.bundle, self.seconds = key, bundle, seconds
        self._on_evict = on_evict
        self._lock = threading.Lock()

    def __del__(self) -> None:
        with self._lock:
            if self.bundle is None:
                return
            self.bundle = None
        self._on_evict(str(self.key))


def load_expert_bundle(registry: Registry, key: ExpertKey, model: ResolvedModel, cache_dir: Path):
    """Materialise the key's expert and connectors versions and build the insertion bundle."""
    from llamdex.connectors_io import ConnectorsError
    from llamdex.expert import ExpertError
    from llamdex.insertion import load_bundle

    try:
        expert = registry.resolve(key.tenant, "expert", key.name, key.expert_version)
        connectors = registry.resolve(key.tenant, "connectors", key.name, key.connectors_version)
    except NotFound as exc:
        raise EngineError(404, f"expert {key}: {exc}") from None
    expert_dir = registry.materialize(expert, cache_dir)
    connectors_dir = registry.materialize(connectors, cache_dir)
    try:
        return load_bundle(expert_dir, connectors_dir, model.content_hash)
    except (ConnectorsError, ExpertError) as exc:
        raise EngineError(422, f"expert {key} cannot be served on base model {model.id!r}: {exc}") from None


class ExpertCacheStats:
    """Statistics of the multiplexed expert LRU of one replica: which keys are resident, loads, hits,
    misses, evictions, bundles still alive (for metrics and ``/stats``). Not a registry: artifacts
    live in ``cluster.registry.Registry``; this only counts what the replica holds."""

    def __init__(self) -> None:
        self.resident: set[str] = set()
        self._refs: list[weakref.ref] = []  # every bundle ever loaded (bundles are not hashable)
        self.loads = self.hits = self.misses = self.evictions = 0
        self.last_load_s: float | None = None

    def loaded(self, entry: LoadedExpert) -> None:
        self.resident.add(str(entry.key))
        self._refs.append(weakref.ref(entry.bundle))
        self.loads += 1
        self.last_load_s = entry.seconds

    def evicted(self, key: str) -> None:
        self.resident.discard(key)
        self.evictions += 1

    def alive(self) -> int:
        """How many loaded bundles are still referenced anywhere (call gc.collect() first)."""
        self._refs = [r for r in self._refs if r() is not None]
        return len(self._refs)


# ---------------------------------------------------------------------------- generation hooks
def question_of(req: GenerationRequest) -> str:
    """The text an expert answers: the last user message (chat) or the prompt (completions)."""
    if req.messages is not None:
        users = [m.get("content") or "" for m in req.messages if m.get("role") == "user"]
        if not users or not users[-1].strip():
            raise EngineError(400, "messages: an expert model answers the last user message; "
                                   "send a non-empty message with role 'user'")
        return users[-1]
    if not (req.prompt or "").strip():
        raise EngineError(400, "prompt: an expert model answers the prompt as a question; send a non-empty prompt")
    return req.prompt or ""


def expert_prompt_ids(tokenizer, bundle, req: GenerationRequest) -> list[int]:
    """The connectors' training prompt for this request (see the module docstring)."""
    from llamdex.prompting import chat_prompt_ids

    return chat_prompt_ids(tokenizer, bundle.spec.system_prompt, [question_of(req)])[0]


def class_answer(bundle, last_logits: torch.Tensor) -> tuple[dict[str, Any], int]:
    """The prediction at the last slot: softmax over the class answer tokens, argmax class.
    Returns (label, answer token, probabilities) and the answer token id."""
    spec = bundle.spec
    scores = last_logits[spec.class_token_ids].float()
    probs = torch.softmax(scores, dim=-1).tolist()
    best = int(scores.argmax())
    return ({"label": spec.class_names[best], "answer": spec.class_token_strings[best],
             "probabilities": dict(zip(spec.class_names, probs, strict=True))}, spec.class_token_ids[best])


# ---------------------------------------------------------------------------- batched prediction
class EnginePredictor:
    """``predict`` through an engine that answers expert questions itself (``engine.predict``)."""

    def __init__(self, engine):
        self.engine = engine
        self.batches = 0

    async def predict(self, bundle, question: str) -> dict[str, Any]:
        self.batches += 1
        return await self.engine.predict(bundle, question)


class PredictBatcher:
    """Collects concurrent predict calls (any experts) into one ``predict_many`` forward.

    Calls arriving within ``wait_s`` of the first (up to ``max_size``) form one batch, run on
    the engine thread between forwards (``submit``), so they never race a generation step.
    """

    def __init__(self, model, tokenizer, max_size: int, wait_s: float,
                 submit: Callable[[Callable[[], Any]], concurrent.futures.Future]):
        self.model, self.tok = model, tokenizer
        self.max_size, self.wait_s, self.submit = max_size, wait_s, submit
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0

    async def predict(self, bundle, question: str) -> dict[str, Any]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((bundle, question, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_size and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            await self._run(items)
            del items  # do not keep the last batch's bundles alive while idle

    async def _run(self, items: list) -> None:
        from llamdex.insertion import predict_many

        self.batches += 1
        bundles, questions = [b for b, _, _ in items], [q for _, q, _ in items]
        try:
            results = await asyncio.wrap_future(self.submit(
                lambda: predict_many(self.model, self.tok, bundles, questions)))
        except Exception as exc:  # fail this batch's calls, keep the loop alive
            log.error("experts.predict_failed", error=repr(exc), rows=len(items), exc_info=True)
            for _, _, fut in items:
                if not fut.done():
                    fut.set_exception(EngineError(500, f"internal error: {exc!r}"))
            return
        for (_, _, fut), result in zip(items, results, strict=True):
            if not fut.done():
                fut.set_result({**result, "batch_rows": len(items)})
