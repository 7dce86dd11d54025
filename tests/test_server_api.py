"""A property-based run over every route of `orpo serve`'s OpenAPI schema (schemathesis: valid and
invalid requests generated from the schema): no 5xx, every answer as the schema describes it,
and afterwards the server still answers and scores a reference pair exactly as before."""

from __future__ import annotations

import pytest
import schemathesis
import tiny
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.generation import GenerationMode

from serve.export.convert import convert

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [
    checks.not_a_server_error,
    checks.response_schema_conformance,
    checks.status_code_conformance,
    checks.content_type_conformance,
]
REFERENCE = {"prompt": "What is 12 + 30?", "chosen": "12 + 30 = 42", "rejected": "12 + 30 = 43"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from serve.serving.app import LOCAL_HOSTS, create_app

    root = tmp_path_factory.mktemp("api")
    tokenizer = tiny.build_tokenizer(None, bos_token="<|endoftext|>")
    tiny.build_model("llama", root / "hf", tokenizer=tokenizer, initializer_range=0.1)
    model = convert(root / "hf", root / "m.gguf", "f16")
    # schemathesis's ASGI client calls the app as http://testserver; a small context keeps generations short
    return create_app(
        model, api_key=KEY, n_ctx=128, n_threads=2, request_timeout=20, allowed_hosts=(*LOCAL_HOSTS, "testserver")
    )


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_no_request_from_the_schema_gets_a_5xx_or_an_answer_off_the_schema(app, mode):
    with TestClient(app, base_url="http://localhost") as client:
        before = client.post("/v1/score", json=REFERENCE, headers=AUTH)
        assert before.status_code == 200, before.text
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} == {
            "/health",
            "/v1/models",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/score",
        }
        for operation in operations:
            if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
                continue  # nothing to get wrong in a GET without parameters

            @given(operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
            )
            def call(case):
                case.call_and_validate(headers=AUTH, checks=CHECKS)

            call()
        assert client.get("/health").status_code == 200
        after = client.post("/v1/score", json=REFERENCE, headers=AUTH)
        assert after.json() == before.json()
