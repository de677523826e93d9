"""Retry a replica call that was lost with its replica (killed, crashed, node gone).

Non-streaming generation and predictions have no side effects, so when the replica serving one
dies (Ray raises ``ActorDiedError`` / ``ActorUnavailableError``, both ``RayActorError``) the
router sends the same request again. Serve's handle has by then marked the dead replica as
unusable (``Router._handle_actor_died_error``), so the retry goes to another replica, or waits
for the replacement Serve starts. After ``attempts`` losses the caller gets a 503 that says so,
never a 500. Streams are not retried: their first tokens may already be with the client.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError

from cluster.logs import get_logger
from serve_app.ingress.openai_api import OpenAIError

log = get_logger("retry")
T = TypeVar("T")
BACKOFF_S = 0.25


def attempts_from_env() -> int:
    """``ATELIER_REPLICA_RETRIES`` (default 4): attempts per request; 1 turns retrying off."""
    return max(1, int(os.environ.get("ATELIER_REPLICA_RETRIES", "4")))


async def call_with_retry(call: Callable[[], Awaitable[T]], what: str, attempts: int | None = None,
                          backoff_s: float = BACKOFF_S) -> T:
    """``await call()``; on a lost replica, call again (up to ``attempts`` times, growing backoff)."""
    attempts = attempts or attempts_from_env()
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except RayActorError as exc:
            log.warning("router.replica_lost", what=what, attempt=attempt, of=attempts,
                        error=type(exc).__name__)
            if attempt == attempts:
                raise OpenAIError(503, f"{what}: the replica serving this request was lost {attempts} times in a "
                                       "row (replicas restarting); retry shortly", type_="unavailable") from None
            await asyncio.sleep(backoff_s * attempt)
    raise AssertionError("unreachable")
