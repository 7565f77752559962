"""Property test driven by the app's own OpenAPI schema: no request body makes the server answer 5xx, on a
RoPE model with a large context and on a GPT-2 model with absolute positions and only 64 of them."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlm.inference.app import create_app
from nlm.inference.settings import ServerSettings

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def _schema_of(route: str) -> dict:
    spec = create_app(ServerSettings()).openapi()
    ref = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _typed(prop: dict):
    """Values of roughly the declared type (edges included), or anything at all."""
    kinds = [p.get("type") for p in prop.get("anyOf", [prop])]
    options = [json_values]
    if "string" in kinds:
        options.append(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
    if "integer" in kinds:
        options.append(st.integers(-5, 600))
    if "number" in kinds:
        options.append(st.floats(-1, 3, allow_nan=False))
    if "boolean" in kinds:
        options.append(st.booleans())
    if "array" in kinds:
        options.append(st.lists(st.text(max_size=5) | st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                                                                  "content": st.text(max_size=20)}), max_size=5))
    return st.one_of(*options)


def bodies(route: str):
    schema = _schema_of(route)
    fields = {name: _typed(prop) for name, prop in schema["properties"].items()}
    known = st.fixed_dictionaries({}, optional=fields)
    with_extra = st.tuples(known, st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=2)).map(lambda kv: {**kv[1], **kv[0]})
    return st.one_of(known, with_extra, json_values)


ROUTES = ["/invocations", "/v1/completions", "/v1/chat/completions"]


@pytest.fixture(params=["served", "served_small_context"])
def server(request):
    return request.getfixturevalue(request.param)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_body_yields_a_server_error(server, data):
    route = data.draw(st.sampled_from(ROUTES))
    body = data.draw(bodies(route))
    response = server.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (route, body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["type"] and error["message"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), route=st.sampled_from(ROUTES))
def test_raw_bytes_never_yield_a_server_error(server, raw, route):
    response = server.post(route, content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500, (route, raw, response.text)


def test_small_context_overruns_are_422_naming_the_limit(served_small_context):
    for body in ({"prompt": "hello", "max_new_tokens": 300}, {"prompt": "the quick brown fox " * 3, "max_new_tokens": 40}):
        response = served_small_context.post("/invocations", json=body)
        assert response.status_code == 422 and "context of 64 tokens" in response.json()["error"]["message"], response.text
    response = served_small_context.post("/v1/completions", json={"prompt": "hello " * 70})
    assert response.status_code == 422 and "context is 64 tokens" in response.json()["error"]["message"]
    fitted = served_small_context.post("/invocations", json={"prompt": "the quick brown fox " * 3, "temperature": 0})
    assert fitted.status_code == 200 and fitted.json()["generation_config"]["max_length"] <= 64
    sampled = served_small_context.post("/invocations", json={"prompt": "hello", "max_new_tokens": 4}).json()
    assert sampled["generation_config"]["do_sample"] is True and sampled["generation_config"]["top_p"] == 0.9
