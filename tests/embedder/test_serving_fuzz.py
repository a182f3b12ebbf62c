"""Schemathesis against the serving API's own OpenAPI schema, over real HTTP (uvicorn in a thread).

Generated requests, valid and invalid per the schema, in both encodings and for every route, never
get a 5xx, and every answer is a status, content type and body shape that the schema documents.
The app wraps a real, untrained ResNet-18 and a small gallery (the same as test_serving_api's).
"""

from __future__ import annotations

import threading

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.embedder.test_serving_api import app_client
from tests.helpers import free_port, wait_http

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served(loaded):
    app = app_client(loaded).app
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz")
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_generated_requests_never_get_a_5xx_and_match_the_schema(served, mode):
    # (schemathesis's pytest plugin does not work with pytest 9: its Python API and hypothesis are used instead)
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /embed", "POST /similar", "GET /readyz", "GET /metrics"}
    calls: dict[str, list[int]] = {}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not (operation.body or operation.query):
            continue  # nothing to get wrong in a GET without parameters
        media_types = [None] if not operation.body else [body.media_type for body in operation.body]
        for media_type in media_types:

            @given(case=operation.as_strategy(mode, media_type=media_type))
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                response = case.call_and_validate(base_url=served, checks=CHECKS)
                calls.setdefault(case.operation.label + (f" {case.media_type}" if case.media_type else ""),
                                 []).append(response.status_code)

            check()
    # Every operation and encoding was exercised; the bodies reached the image decoder (4xx) or were embedded.
    assert {"POST /embed multipart/form-data", "POST /embed application/json",
            "POST /similar multipart/form-data", "POST /similar application/json"} <= calls.keys()
    statuses = {code for codes in calls.values() for code in codes}
    assert max(statuses) < 500 and statuses & {400, 413, 415, 422}, calls
    print({label: sorted(set(codes)) for label, codes in calls.items()})
