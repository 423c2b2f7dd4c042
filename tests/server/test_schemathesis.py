"""Property-based fuzzing of every operation in the app's OpenAPI schema: no input may cause a 5xx.

Runs in-process over ASGI against the fake engine (conftest.py), bounded and derandomized so it is
fast and repeatable.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from model.defaults import DefaultModelMissing, require_default_model
from model.tokenizer import Tokenizer
from server.app import create_app
from tests.server.conftest import FakeEngine, fake_settings

try:
    _tokenizer = Tokenizer.from_file(require_default_model())
except DefaultModelMissing as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

app = create_app(fake_settings(), engine=FakeEngine(_tokenizer, max_waiting=1000), tokenizer=_tokenizer)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    )
    if response.status_code >= 400 and response.status_code != 405:
        error = response.json()["error"]  # every error is in OpenAI's shape
        assert {"message", "type", "param", "code"} <= set(error)
