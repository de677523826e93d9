"""Request checks the wire models cannot express, run by the router before anything is resolved.

The OpenAI request models accept extra fields (the official client may send some we ignore on
purpose), so what Atelier does *not* do must be refused here by name rather than silently
dropped: tool calling, log-probabilities, penalties, biasing. The rest bounds what a request may
make a replica do: a handful of short, non-empty stop strings, a seed the sampler can use, text
content parts whose text is a string. Each refusal is a 400 whose ``param`` names the field.
"""

from __future__ import annotations

from serve_app.ingress.openai_api import OpenAIError, bad_request

MAX_STOP = 16
"""Stop strings per request (OpenAI allows 4); each is checked on every generated token."""
MAX_STOP_CHARS = 256
MIN_TEMPERATURE = 1e-6
"""Smallest non-zero temperature: below it float32 logits / temperature overflow to inf (NaN probabilities)."""
MIN_TOP_P = 1e-6
"""Smallest top_p: below it the nucleus can round to nothing (NaN probabilities); 1e-6 already keeps one token."""
SEED_BOUND = 2**63
"""Seeds must satisfy ``-2**63 <= seed < 2**63`` (what torch's generator accepts on every platform)."""

_UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "logprobs": "log-probabilities", "top_logprobs": "log-probabilities",
    "logit_bias": "logit biasing", "presence_penalty": "presence penalties",
    "frequency_penalty": "frequency penalties", "best_of": "best-of sampling", "suffix": "suffixes",
    "response_format": "structured output", "audio": "audio output", "modalities": "non-text output",
    "prediction": "predicted outputs",
}


def _is_default(field: str, value) -> bool:
    """True if ``value`` asks for nothing beyond what Atelier does (the client sent a default)."""
    if value in (None, False, 0, 0.0, "", [], {}):
        return True
    if field == "best_of":
        return value == 1
    if field == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    if field == "modalities":
        return value == ["text"]
    if field in ("tool_choice", "function_call"):
        return value == "none"
    return False


def check_request(body, endpoint: str) -> None:
    """Refuse what a chat/completion request asks for but Atelier cannot do or bound (400, naming it)."""
    for field, value in (body.model_extra or {}).items():
        if field in _UNSUPPORTED and not _is_default(field, value):
            raise bad_request(f"{field}: {_UNSUPPORTED[field]} is not supported by Atelier; remove the field",
                              field)
    stops = body.stop_list()
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop: {len(stops)} stop strings, at most {MAX_STOP} are allowed", "stop")
    for i, s in enumerate(stops):
        if not s:
            raise bad_request(f"stop[{i}]: stop strings must be non-empty", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise bad_request(f"stop[{i}]: {len(s)} characters, at most {MAX_STOP_CHARS} are allowed", "stop")
    if 0 < body.temperature < MIN_TEMPERATURE:
        raise bad_request(f"temperature: {body.temperature:g} divides the logits into overflow; use 0 for greedy "
                          f"decoding or at least {MIN_TEMPERATURE:g}", "temperature")
    if body.top_p is not None and body.top_p < MIN_TOP_P:
        raise bad_request(f"top_p: {body.top_p:g} is below {MIN_TOP_P:g} and leaves no token to sample; use temperature "
                          f"0 for greedy decoding or top_p of at least {MIN_TOP_P:g}", "top_p")
    if body.seed is not None and not -SEED_BOUND <= body.seed < SEED_BOUND:
        raise bad_request(f"seed: must be a 64-bit signed integer (-2**63 <= seed < 2**63), got {body.seed}", "seed")
    if endpoint == "completion" and not body.prompt_text():
        raise bad_request("prompt: must not be empty (an empty prompt has no token to continue from)", "prompt")
    if endpoint == "chat":
        for i, message in enumerate(body.messages):
            if not isinstance(message.content, list):
                continue
            for j, part in enumerate(message.content):
                where = f"messages[{i}].content[{j}]"
                if part.get("type") != "text":
                    raise bad_request(f"{where}.type: {part.get('type')!r} is not supported; send text parts only",
                                      f"{where}.type")
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.text: must be a string, got {type(part.get('text')).__name__}",
                                      f"{where}.text")


PROMPT_FIELD = {"chat": "messages", "completion": "prompt", "predict": "question"}


def replica_refusal(status: int, message: str, endpoint: str) -> OpenAIError:
    """A replica's 4xx refusal of the request's content; a 400 is about the prompt (its length)."""
    param = PROMPT_FIELD.get(endpoint) if status == 400 else None
    return OpenAIError(status, message, type_="server_error" if status >= 500 else "invalid_request_error",
                       param=param)
