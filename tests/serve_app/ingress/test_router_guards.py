"""The router's guards without Ray: request bounds (serve_app.ingress.limits) and the retry of calls lost
with their replica (serve_app.ingress.retry), against Ray's real exception types."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from serve_app.ingress.limits import MAX_STOP, check_request
from serve_app.ingress.openai_api import ChatCompletionRequest, CompletionRequest, OpenAIError
from serve_app.ingress.retry import call_with_retry


def chat(**over) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                 **over})


@pytest.mark.parametrize("over, param", [
    ({"stop": [str(i) for i in range(MAX_STOP + 1)]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"seed": 2**63}, "seed"),
    ({"temperature": 5e-324}, "temperature"),
    ({"top_p": 5e-324}, "top_p"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
])
def test_refusals_name_the_field(over, param):
    with pytest.raises(OpenAIError) as err:
        check_request(chat(**over), "chat")
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("over", [
    {}, {"temperature": 0}, {"temperature": 1e-6}, {"stop": ["\n", "END"]}, {"seed": 2**63 - 1}, {"seed": -(2**63)}, {"logprobs": False},
    {"frequency_penalty": 0}, {"response_format": {"type": "text"}}, {"tool_choice": "none"},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
])
def test_what_the_openai_client_sends_by_default_passes(over):
    check_request(chat(**over), "chat")
    check_request(CompletionRequest.model_validate({"model": "base", "prompt": "x"}), "completion")


def test_empty_completion_prompt_is_refused():
    """Found by schemathesis: an empty prompt made an empty batch row and failed the whole engine wave."""
    for prompt in ("", [""]):
        with pytest.raises(OpenAIError) as err:
            check_request(CompletionRequest.model_validate({"model": "auto", "prompt": prompt}), "completion")
        assert err.value.status == 400 and err.value.param == "prompt"


def test_lost_replica_calls_are_retried_then_a_503():
    calls = []

    async def flaky(fail: int, exc):
        calls.append(1)
        if len(calls) <= fail:
            raise exc
        return "ok"

    assert asyncio.run(call_with_retry(lambda: flaky(2, ActorDiedError()), "pool", backoff_s=0)) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(OpenAIError) as err:
        asyncio.run(call_with_retry(lambda: flaky(9, ActorUnavailableError("gone", None)), "pool", attempts=3,
                                    backoff_s=0))
    assert err.value.status == 503 and len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError):  # anything but a lost replica is not retried
        asyncio.run(call_with_retry(lambda: flaky(1, ValueError("bad")), "pool", backoff_s=0))
    assert len(calls) == 1
