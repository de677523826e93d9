"""Shared helpers that turn pydantic validation errors into 'path: problem; fix: ...' lines.

Wire formats (schema.json, expert.json) are validated by pydantic models; tenants need messages
that name the exact field and say how to fix it, all problems at once. Semantic rules raise
:func:`rules_error` (a bundle of (relative path, message) problems) from validators, and
:func:`format_errors` expands everything into one line per problem.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

_RULES = "llamdex_rules"  # error type carrying our own (relative path, message) problems

_PYDANTIC_FIXES = {
    "extra_forbidden": "remove this key (check the spelling against the documented fields)",
    "missing": "add this field",
    "literal_error": "use one of the allowed values",
    "string_type": "write it as a JSON string",
    "string_pattern_mismatch": "write it in the documented format",
    "list_type": "write it as a JSON list",
    "float_parsing": "write it as a JSON number",
    "float_type": "write it as a JSON number",
    "int_type": "write it as a whole JSON number",
    "int_from_float": "write it as a whole JSON number",
    "int_parsing": "write it as a whole JSON number",
    "bool_type": "write it as true or false",
    "model_type": "write it as a JSON object",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
}


def rules_error(problems: list[tuple[str, str]]) -> PydanticCustomError:
    """Bundle semantic problems (relative path, 'message; fix: ...') into one pydantic error."""
    text = "; ".join(f"{p}: {m}" if p else m for p, m in problems)
    return PydanticCustomError(_RULES, text, {"problems": problems})


def loc_path(parts: tuple[Any, ...]) -> str:
    """('features', 2, 'range') -> 'features[2].range'."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


def join_path(base: str, rel: str) -> str:
    """Append a relative path ('range', '[1]', '') to a base path."""
    sep = "" if not (base and rel) or rel.startswith("[") else "."
    return f"{base}{sep}{rel}"


def short(value: Any) -> str:
    """repr() cut to 60 characters, for echoing bad input in messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_errors(exc: ValidationError, root: str = "<root>") -> list[str]:
    """One 'path: problem; fix: ...' line per problem in a pydantic ValidationError."""
    lines: list[str] = []
    for err in exc.errors():
        base = loc_path(tuple(err["loc"]))
        if err["type"] == _RULES:
            for rel, msg in err["ctx"]["problems"]:
                lines.append(f"{join_path(base, rel) or root}: {msg}")
            continue
        fix = _PYDANTIC_FIXES.get(err["type"], "correct the value")
        lines.append(f"{base or root}: {err['msg']} (got {short(err.get('input'))}); fix: {fix}")
    return lines


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key (the second value would silently win)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"{key}: key appears twice in one JSON object; fix: keep one")
        out[key] = value
    return out


def parse_json_strict(text: str, origin: str) -> Any:
    """json.loads that refuses duplicate keys; errors are ValueError lines naming ``origin``."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except DuplicateKeyError as e:
        raise ValueError(f"{origin}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         "fix: correct the JSON syntax") from None
