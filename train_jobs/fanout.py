"""Running one Ray Train run per tenant side by side, and reporting every tenant that failed.

A job that trains several tenants must not stop at the first failure (the others' finished work
would go unpublished and their errors unseen) nor exit 0 when some failed: :func:`each_completed`
hands back every tenant's result as it finishes and, once all have ended, raises
:class:`TenantsFailed` naming each failed tenant and its error (the process then exits non-zero).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

from cluster.logs import get_logger

log = get_logger("fanout")


class TenantsFailed(RuntimeError):
    """Some tenants' runs failed; the message names every one and its error."""


def each_completed(futures: dict[concurrent.futures.Future, Any], what: str) -> Iterator[tuple[Any, Any]]:
    """Yield ``(job, result)`` for every future that succeeds, as it finishes (``job`` has ``tenant`` and
    ``name``); after the last, raise :class:`TenantsFailed` if any failed."""
    failed: list[str] = []
    for fut in concurrent.futures.as_completed(futures):
        job = futures[fut]
        try:
            out = fut.result()
        except Exception as exc:  # noqa: BLE001 - reported with every other tenant's failure below
            log.error(f"{what}.failed", tenant=job.tenant, name=job.name, error=str(exc)[:2000])
            failed.append(f"{job.tenant}/{job.name}: {type(exc).__name__}: {exc}")
            continue
        yield job, out
    if failed:
        raise TenantsFailed(f"{len(failed)} of {len(futures)} {what} runs failed (the others finished): "
                            + " | ".join(failed))
