"""Request validation of the OpenAI-compatible models, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    generation_limit,
)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


@pytest.mark.parametrize("fields,prompt_tokens,expected", [
    ({}, 10, 256),                              # the default when it fits
    ({}, 8192 - 5, 5),                          # the default cut to what the context leaves
    ({"max_tokens": 300}, 10, 300),             # asked: as asked
    ({"max_completion_tokens": 7}, 8192 - 7, 7),
])
def test_generation_limit(fields, prompt_tokens, expected):
    assert generation_limit(completion(**fields), False, prompt_tokens, 8192, 256) == expected


@pytest.mark.parametrize("fields,prompt_tokens,is_chat,param,named", [
    ({}, 8192, False, "prompt", "leaves none"),
    ({}, 8192, True, "messages", "leaves none"),
    ({"max_tokens": 6}, 8192 - 5, False, "prompt", "max_tokens is 6"),
    ({"max_completion_tokens": 6}, 8192 - 5, True, "messages", "max_completion_tokens is 6"),
])
def test_generation_limit_past_the_context(fields, prompt_tokens, is_chat, param, named):
    with pytest.raises(APIError) as err:
        generation_limit(completion(**fields), is_chat, prompt_tokens, 8192, 256)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.code == "context_length_exceeded" and named in err.value.message


@pytest.mark.parametrize("name,value", [
    ("max_token", 5), ("temprature", 0.2), ("repetition_penalty", 1.2), ("min_p", 0.1),
    ("ignore_eos", True), ("audio", {"voice": "alloy"}),
])
def test_unknown_fields_are_refused_by_name(name, value):
    with pytest.raises(APIError) as err:
        completion(**{name: value}).check_supported()
    assert err.value.param == name and err.value.code == "unknown_parameter"


@pytest.mark.parametrize("name", ["reasoning_effort", "audio", "verbosity",
                                  "web_search_options", "max_token"])
def test_unknown_fields_sent_as_null_are_absent(name):
    """OpenAI reads an explicit null as an absent field, and SDKs and proxies send them; a
    field this server does not know, sent as null, was a 400 unknown_parameter. With a value
    it still is."""
    completion(**{name: None}).check_supported()
    with pytest.raises(APIError) as err:
        completion(**{name: "low"}).check_supported()
    assert err.value.param == name and err.value.code == "unknown_parameter"


def test_fields_that_change_nothing_and_neutral_values_are_accepted():
    completion(user="u", metadata={"k": "v"}, store=False, service_tier="auto",
               parallel_tool_calls=True, prompt_cache_key="k", safety_identifier="s",
               modalities=["text"], logprobs=None, presence_penalty=0).check_supported()
    with pytest.raises(APIError) as err:
        completion(modalities=["text", "audio"]).check_supported()
    assert err.value.param == "modalities"


def test_tool_calls_in_messages_are_refused_not_dropped():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(ValidationError, match="tool calls"):
        ChatCompletionRequest.model_validate({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]}]})
    ok = ChatCompletionRequest.model_validate({"messages": [
        {"role": "assistant", "content": "hi", "tool_calls": []}]})
    assert ok.messages[0].text() == "hi"


def test_top_p_zero_and_any_int64_seed_are_accepted():
    assert completion(top_p=0).top_p == 0.0
    assert completion(seed=-1).seed == -1
    with pytest.raises(ValidationError):
        completion(seed=2**63)
