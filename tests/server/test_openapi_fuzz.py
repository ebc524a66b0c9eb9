"""The HTTP API under fuzzing: schemathesis reads the real app's /openapi.json and sends what it generates
from it (valid requests and requests that break the schema) to a real 2-stage cluster over HTTP on
127.0.0.1. No answer is a 5xx, every status and body is one the document lists, and what the document
promises about a field (an empty prompt is refused) holds.

The cluster serves a tiny checkpoint with a 64-token context, so that no generated request generates
for long: the run stays within a minute on a loaded 2-core machine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from server_helpers import API_KEY, ClusterServer

from meshllm.models.tiny import TinySpec, make_checkpoint

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,  # a request that breaks the schema is refused with a 4xx
]
# Per operation and mode: about 25 s in all; MESHLLM_FUZZ_EXAMPLES=1000 for a longer hunt.
EXAMPLES = int(os.environ.get("MESHLLM_FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def short_context_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServer]:
    folder = tmp_path_factory.mktemp("tiny-short-context")
    checkpoint = make_checkpoint(folder, spec=TinySpec(num_hidden_layers=4, max_position_embeddings=64))
    server = ClusterServer(checkpoint).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(
    short_context_cluster: ClusterServer,
) -> None:
    schema = schemathesis.openapi.from_url(f"{short_context_cluster.url}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert (
        len(operations) == 11
    )  # every route of the API (the Messages API and the console too) is in the document
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                derandomize=True,  # the same requests on every run
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(checks=CHECKS, timeout=60)

            try:
                call()
            except Unsatisfiable:  # nothing breaks the schema of an operation without parameters
                assert mode == GenerationMode.NEGATIVE, operation.label
            except (
                Exception,
                FailureGroup,
            ) as error:  # every operation is fuzzed; all failures are reported together
                failures.append(f"{operation.label} ({mode.value}): {error}")
    assert not failures, "\n\n".join(failures)


def test_the_document_lists_every_error_with_the_openai_body(short_context_cluster: ClusterServer) -> None:
    document = httpx.get(f"{short_context_cluster.url}/openapi.json", timeout=10).json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = document["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "422", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == error, (path, status)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(document["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}


def test_the_document_says_what_the_server_refuses_and_the_server_refuses_it(
    short_context_cluster: ClusterServer,
) -> None:
    document = httpx.get(f"{short_context_cluster.url}/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 63
    url = short_context_cluster.url
    for body in ({"prompt": ""}, {"prompt": []}, {"prompt": "hi", "max_tokens": 65}):
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error", body
    reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert reply.status_code == 400
    keyed = httpx.post(f"{short_context_cluster.keyed_url}/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert keyed.status_code == 401 and keyed.json()["error"]["code"] == "invalid_api_key"
    assert API_KEY not in keyed.text
