"""The privacy ledger of a published expert, as listings show it.

Read from the version's ``expert.json`` (the ledger the weights were saved with, validated when
the version was published), never from the manifest's free-form metadata, which an uploader
may set to anything.
"""

from __future__ import annotations

import json

from cluster.logs import get_logger

log = get_logger("ledger")


def expert_ledger(registry, manifest, spec: dict | None = None) -> dict | None:
    """``DPLedger.public_view()`` of an expert version: ``dp`` (whether it is DP), ε spent, δ,
    accountant, ``secure_rng``, noise multiplier, sample rate, steps... ``None`` if the file
    cannot be read. ``spec`` = the already parsed expert.json, if the caller has it."""
    from llamdex.expert_spec import DPLedger

    try:
        spec = spec if spec is not None else json.loads(registry.read_file(manifest, "expert.json"))
        return DPLedger.model_validate(spec["dp"]).public_view()
    except (LookupError, ValueError, TypeError) as exc:  # NotFound is a LookupError; bad JSON a ValueError
        log.warning("ledger.unreadable", ref=str(manifest.ref), error=repr(exc))
        return None
