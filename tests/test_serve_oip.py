"""The Open Inference Protocol (KServe v2 REST) beside /v1 (`logitguard.serve.oip`): a real uvicorn server,
driven by tritonclient (the client Triton, KServe and Seldon users have) and by plain httpx.

Answers equal `Guard.check` in-process, with JSON and binary tensors, for a guard that reads noise queries
and for ones that do not; wrong C, K, NaN, unknown models and malformed binary bodies come back as
``{"error": ...}`` with the protocol's statuses; metrics and the drift watch count v2 rows like /v1 rows.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitguard.errors import LogitguardError
from logitguard.evaluation.guard import fit_guard
from logitguard.serve import create_app, serve_in_thread
from logitguard.serve.oip_codec import HEADER_LENGTH

INFER = "/v2/models/logitguard/infer"
ALL_OUTPUTS = ("label", "flagged", "score", "model_label")


@contextmanager
def server(guard, **options):
    """A real server for `guard`; yields (httpx client, "host:port" for tritonclient)."""
    with serve_in_thread(create_app(guard, **options)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, url.removeprefix("http://")


@pytest.fixture(scope="module")
def th():
    return pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) drives these tests")


@pytest.fixture(scope="module")
def noisy_server(noisy_guard):
    with server(noisy_guard, max_rows=500, max_body_bytes=2**20) as running:
        yield running


def assert_outputs_match(outputs: dict[str, np.ndarray], guard, logits, noisy=None) -> None:
    """Every output returned equals `guard.check` in-process (scores to float32 rounding)."""
    expected = guard.check(logits, noisy)
    assert outputs, "no outputs"
    for name, values in outputs.items():
        want = getattr(expected, name)
        assert values.shape == want.shape, name
        if name == "score":
            assert values.dtype == np.float32
            np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-6)
        else:
            assert values.dtype == (np.bool_ if name == "flagged" else np.int64), name
            np.testing.assert_array_equal(values, want, err_msg=name)


def triton_inputs(th, logits, noisy=None, *, binary: bool, datatype: str = "FP32") -> list:
    inputs = []
    for name, values in (("logits", logits), ("noisy_logits", noisy)):
        if values is not None:
            values = np.asarray(values, dtype={"FP32": np.float32, "FP64": np.float64, "INT32": np.int32}[datatype])
            tensor = th.InferInput(name, list(values.shape), datatype)
            tensor.set_data_from_numpy(values, binary_data=binary)
            inputs.append(tensor)
    return inputs


# -- tritonclient ----------------------------------------------------------------------------------


def test_tritonclient_health_and_metadata(th, noisy_server):
    _, url = noisy_server
    client = th.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("logitguard") and client.is_model_ready("logitguard", "1")
    assert not client.is_model_ready("other") and not client.is_model_ready("logitguard", "2")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "logitguard" and "binary_tensor_data" in server_meta["extensions"]
    meta = client.get_model_metadata("logitguard")
    assert meta["name"] == "logitguard" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                              {"name": "noisy_logits", "datatype": "FP32", "shape": [-1, 3, 10]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("label", "INT64", [-1]), ("flagged", "BOOL", [-1]), ("score", "FP32", [-1]), ("model_label", "INT64", [-1])]
    assert client.get_model_metadata("logitguard", "1") == meta
    with pytest.raises(th.InferenceServerException) as missing:
        client.get_model_metadata("other")
    assert missing.value.status() == "404" and "unknown model 'other'" in missing.value.message()


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_tritonclient_infer_equals_guard_check(th, noisy_server, noisy_guard, digits_test, binary_in, binary_out):
    _, url = noisy_server
    x, noisy = digits_test.logits[:300], digits_test.noisy_logits[:300]
    x32, noisy32 = x.astype(np.float32), noisy.astype(np.float32)  # what the client sends
    client = th.InferenceServerClient(url)
    inputs = triton_inputs(th, x, noisy, binary=binary_in)
    outputs = [th.InferRequestedOutput(name, binary_data=binary_out) for name in ALL_OUTPUTS]
    result = client.infer("logitguard", inputs, outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "logitguard"
    assert all(("parameters" in o) == binary_out for o in response["outputs"])
    got = {name: result.as_numpy(name) for name in ALL_OUTPUTS}
    assert_outputs_match(got, noisy_guard, x32, noisy32)
    expected = noisy_guard.check(x32, noisy32)
    assert (expected.label == -1).any() and not expected.flagged.all()  # rejections are in the answer (-1)


def test_tritonclient_defaults_and_a_subset_of_outputs(th, noisy_server, noisy_guard, digits_test):
    """No outputs named: all of them, binary (tritonclient's default); named outputs: only those, in order."""
    _, url = noisy_server
    x, noisy = digits_test.logits[:40].astype(np.float32), digits_test.noisy_logits[:40].astype(np.float32)
    client = th.InferenceServerClient(url)
    everything = client.infer("logitguard", triton_inputs(th, x, noisy, binary=True))
    assert [o["name"] for o in everything.get_response()["outputs"]] == list(ALL_OUTPUTS)
    assert_outputs_match({n: everything.as_numpy(n) for n in ALL_OUTPUTS}, noisy_guard, x, noisy)
    some = client.infer("logitguard", triton_inputs(th, x, noisy, binary=False), model_version="1",
                        outputs=[th.InferRequestedOutput("score", binary_data=False),
                                 th.InferRequestedOutput("label", binary_data=True)])
    assert [o["name"] for o in some.get_response()["outputs"]] == ["score", "label"]
    assert some.as_numpy("flagged") is None and some.as_numpy("model_label") is None
    assert_outputs_match({n: some.as_numpy(n) for n in ("score", "label")}, noisy_guard, x, noisy)


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32"])
def test_tritonclient_a_guard_without_noise_queries(th, plain_guard, digits_test, datatype):
    x = digits_test.logits[:200]
    if datatype == "INT32":
        x = np.round(x * 100)
    with server(plain_guard, model_name="digits-msp") as (_, url):
        client = th.InferenceServerClient(url)
        meta = client.get_model_metadata("digits-msp")
        assert [i["name"] for i in meta["inputs"]] == ["logits"]
        for binary in (False, True):
            result = client.infer("digits-msp", triton_inputs(th, x, binary=binary, datatype=datatype))
            got = {name: result.as_numpy(name) for name in ALL_OUTPUTS}
            assert_outputs_match(got, plain_guard, x.astype(np.float32) if datatype == "FP32" else x)
        assert not client.is_model_ready("logitguard")  # the name given is the one served
        noisy = digits_test.noisy_logits[:2]
        with pytest.raises(th.InferenceServerException) as extra:  # the model has no such input
            client.infer("digits-msp", triton_inputs(th, x[:2], noisy, binary=True, datatype=datatype))
        assert extra.value.status() == "400" and "unknown input 'noisy_logits'" in extra.value.message()


def test_a_guard_without_detector_offers_no_score(th, digits_split_table, digits_test):
    guard = fit_guard(digits_split_table, detector=None, corrector="svm", on_flag="correct")
    x = digits_test.logits[:30].astype(np.float32)
    with server(guard) as (_, url):
        client = th.InferenceServerClient(url)
        assert [o["name"] for o in client.get_model_metadata("logitguard")["outputs"]] == [
            "label", "flagged", "model_label"]
        result = client.infer("logitguard", triton_inputs(th, x, binary=True))
        assert result.as_numpy("score") is None
        assert_outputs_match({n: result.as_numpy(n) for n in ("label", "flagged", "model_label")}, guard, x)
        with pytest.raises(th.InferenceServerException) as asked:
            client.infer("logitguard", triton_inputs(th, x, binary=True), outputs=[th.InferRequestedOutput("score")])
        assert asked.value.status() == "400" and "unknown output 'score'" in asked.value.message()


def _bad_triton_requests(th, x, noisy) -> list[tuple[str, dict, str, str]]:
    """(id, infer kwargs, status, message fragment): C=10, K=3, max_rows=500."""
    nan = x[:2].copy()
    nan[1, 4] = np.nan
    return [
        ("wrong-C", {"inputs": triton_inputs(th, x[:2, :9], noisy[:2, :, :9], binary=True)}, "400", "expected 10"),
        ("wrong-K", {"inputs": triton_inputs(th, x[:2], noisy[:2, :2], binary=True)}, "400", "expected 3"),
        ("wrong-K-json", {"inputs": triton_inputs(th, x[:2], noisy[:2, :2], binary=False)}, "400", "expected 3"),
        ("nan", {"inputs": triton_inputs(th, nan, noisy[:2], binary=True)}, "400", "NaN"),
        ("missing-noise", {"inputs": triton_inputs(th, x[:2], binary=True)}, "400", "noisy_logits is required"),
        ("too-many-rows", {"inputs": triton_inputs(th, np.ones((501, 10)), np.ones((501, 3, 10)), binary=True)},
         "400", "limit of 500 rows"),
        ("unknown-model", {"model_name": "resnet50", "inputs": triton_inputs(th, x[:2], noisy[:2], binary=True)},
         "404", "unknown model 'resnet50'"),
        ("unknown-version", {"model_version": "3", "inputs": triton_inputs(th, x[:2], noisy[:2], binary=True)},
         "404", "unknown version '3'"),
    ]


BAD = ("wrong-C", "wrong-K", "wrong-K-json", "nan", "missing-noise", "too-many-rows", "unknown-model",
       "unknown-version")


@pytest.mark.parametrize("name", BAD)
def test_tritonclient_errors_carry_the_status_and_message(th, noisy_server, digits_test, name):
    client_http, url = noisy_server
    cases = {c[0]: c[1:] for c in _bad_triton_requests(th, digits_test.logits[:2], digits_test.noisy_logits[:2])}
    assert set(cases) == set(BAD)
    kwargs, status, fragment = cases[name]
    kwargs = {"model_name": "logitguard", **kwargs}
    with pytest.raises(th.InferenceServerException) as refused:
        th.InferenceServerClient(url).infer(**kwargs)
    assert refused.value.status() == status, refused.value
    assert fragment in refused.value.message() and "\n" not in refused.value.message()
    assert client_http.get("/v2/health/live").status_code == 200  # still answering


# -- plain HTTP --------------------------------------------------------------------------------------


def test_a_json_request_over_plain_http(noisy_server, noisy_guard, digits_test):
    client, _ = noisy_server
    x, noisy = digits_test.logits[:25], digits_test.noisy_logits[:25]
    body = {"id": "42", "parameters": {"binary_data_output": False},
            "inputs": [{"name": "logits", "datatype": "FP64", "shape": [25, 10], "data": x.ravel().tolist()},
                       {"name": "noisy_logits", "datatype": "FP64", "shape": [25, 3, 10], "data": noisy.tolist()}],
            "outputs": [{"name": "label"}, {"name": "flagged"}, {"name": "score"}]}  # nested noisy data: allowed
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json" and HEADER_LENGTH not in response.headers
    reply = response.json()
    assert reply["id"] == "42" and (reply["model_name"], reply["model_version"]) == ("logitguard", "1")
    assert [(o["name"], o["datatype"], o["shape"]) for o in reply["outputs"]] == [
        ("label", "INT64", [25]), ("flagged", "BOOL", [25]), ("score", "FP32", [25])]
    got = {o["name"]: np.array(o["data"], dtype={"INT64": np.int64, "BOOL": np.bool_, "FP32": np.float32}[
        o["datatype"]]) for o in reply["outputs"]}
    assert_outputs_match(got, noisy_guard, x, noisy)
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/logitguard/ready").json() == {"name": "logitguard", "ready": True}
    assert "/v2/models/{model_name}/infer" not in client.get("/openapi.json").json()["paths"]


def _binary_body(x: np.ndarray, noisy: np.ndarray) -> tuple[bytes, int]:
    """A valid binary request (float32 inputs, binary outputs) and its JSON header's length."""
    header = json.dumps({"inputs": [
        {"name": "logits", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}},
        {"name": "noisy_logits", "datatype": "FP32", "shape": list(noisy.shape),
         "parameters": {"binary_data_size": noisy.nbytes}}], "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes() + noisy.tobytes(), len(header)


def _header(length) -> dict:
    return {HEADER_LENGTH: str(length)}


def test_unknown_routes_answer_in_each_protocols_error_shape(noisy_server):
    client, _ = noisy_server
    for method, path, status in [("GET", "/v2/nothing/here", 404), ("GET", "/v2/models/logitguard/infer", 405),
                                 ("POST", "/v2/health/live", 405)]:
        reply = client.request(method, path)
        assert reply.status_code == status, (method, path)
        assert set(reply.json()) == {"error"} and "the protocol's routes are" in reply.json()["error"]
        assert "here" not in reply.json()["error"]  # nothing of the request is echoed
    assert client.get("/v2/models/logitguard/infer").headers["allow"] == "POST"
    assert client.get("/v1/nothing").json() == {"detail": "Not Found"}  # /v1 keeps FastAPI's shape


def test_malformed_binary_requests_get_400_with_one_line(noisy_server, noisy_guard, digits_test):
    client, _ = noisy_server
    x, noisy = digits_test.logits[:3].astype(np.float32), digits_test.noisy_logits[:3].astype(np.float32)
    body, length = _binary_body(x, noisy)
    good = client.post(INFER, content=body, headers=_header(length))
    assert good.status_code == 200, good.text
    assert good.headers["content-type"] == "application/octet-stream"
    head = int(good.headers[HEADER_LENGTH])
    reply = json.loads(good.content[:head])
    sizes = [o["parameters"]["binary_data_size"] for o in reply["outputs"]]
    assert sum(sizes) == len(good.content) - head
    label = np.frombuffer(good.content, "<i8", 3, head)
    np.testing.assert_array_equal(label, noisy_guard.check(x, noisy).label)

    long_name = "x" * 5000
    cases = [
        ("header longer than the body", body, _header(len(body) + 1), "Inference-Header-Content-Length is"),
        ("header length not a number", body, _header("12abc"), "Inference-Header-Content-Length is"),
        ("header length of 5000 digits", body, _header("9" * 5000), "Inference-Header-Content-Length is"),
        ("binary sizes without the header", body, {}, "malformed JSON header"),
        ("header cut short", body, _header(length - 5), "malformed JSON header"),
        ("binary data missing", body[:-4], _header(length), "run past the end of the body"),
        ("bytes no input claims", body + b"\0" * 8, _header(length), "8 bytes after the JSON header"),
        ("size disagrees with the shape", body.replace(b'"binary_data_size": 120', b'"binary_data_size": 124', 1),
         _header(length), "takes 120 bytes"),
        ("size without the header", json.dumps({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10],
                                                            "parameters": {"binary_data_size": 40}}]}).encode(), {},
         "has no Inference-Header-Content-Length header"),
        ("unknown datatype", body.replace(b'"FP32"', b'"BF16"', 1), _header(length), "datatype 'BF16'"),
        ("unknown input, long name", json.dumps({"inputs": [{"name": long_name, "datatype": "FP32", "shape": [1],
                                                             "data": [1]}]}).encode(), {}, "unknown input 'xxx"),
        ("NaN token", b'{"inputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [NaN, 1]}]}', {},
         "NaN and Infinity are refused"),
        ("ragged data", json.dumps({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 10],
                                                "data": [[1.0] * 10, [1.0] * 9]}]}).encode(), {}, "ragged"),
        ("shape and data disagree", json.dumps({"inputs": [{"name": "logits", "datatype": "FP32",
                                                            "shape": [2**40, 2**40], "data": [1.0] * 10}]}).encode(),
         {}, "limit of 500 rows"),
        ("count off", json.dumps({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 10],
                                              "data": [1.0] * 19}]}).encode(), {}, "has 19 values; its shape takes 20"),
        ("negative dimension", json.dumps({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10],
                                                       "data": [1.0] * 10}]}).encode(), {}, "non-negative"),
        ("not JSON", b"\xff\xfe garbage", {}, "malformed JSON header"),
    ]
    for what, content, headers, fragment in cases:
        response = client.post(INFER, content=content, headers=headers)
        assert response.status_code == 400, (what, response.text)
        error = response.json()["error"]
        assert fragment in error and "\n" not in error and len(error) < 300, (what, error)
        assert "Traceback" not in response.text


def test_limits_and_encodings(noisy_guard, digits_test):
    x, noisy = digits_test.logits[:3].astype(np.float32), digits_test.noisy_logits[:3].astype(np.float32)
    body, length = _binary_body(x, noisy)
    with server(noisy_guard, max_body_bytes=len(body) - 1) as (client, _):
        large = client.post(INFER, content=body, headers=_header(length))
        assert large.status_code == 413 and "limit of" in large.json()["error"]
        gzip = client.post(INFER, content=body[:10], headers={"content-encoding": "gzip"})
        assert gzip.status_code == 415 and "uncompressed" in gzip.json()["error"]


def test_v2_rows_count_in_the_metrics_and_the_drift_watch(noisy_guard, digits_test):
    x, noisy = digits_test.logits[:50].astype(np.float32), digits_test.noisy_logits[:50].astype(np.float32)
    body, length = _binary_body(x, noisy)
    with server(noisy_guard) as (client, _):
        assert client.post(INFER, content=body, headers=_header(length)).status_code == 200
        assert client.post("/v2/models/other/infer", content=body, headers=_header(length)).status_code == 404
        text = client.get("/metrics").text
        assert 'logitguard_requests_total{endpoint="/v2/models/{model_name}/infer",status="200"} 1.0' in text
        assert 'logitguard_requests_total{endpoint="/v2/models/{model_name}/infer",status="404"} 1.0' in text
        assert "logitguard_rows_checked_total 50.0" in text
        assert client.get("/v1/info").json()["drift"]["rows"] == 50


def test_model_names_are_checked(noisy_guard):
    for name in ("", "a/b", "x" * 101, "tab\there"):
        with pytest.raises(LogitguardError, match="model_name"):
            create_app(noisy_guard, model_name=name)


def test_byte_level_fuzz_of_a_binary_request_never_crashes_the_server(noisy_guard, digits_test):
    x, noisy = digits_test.logits[:2].astype(np.float32), digits_test.noisy_logits[:2].astype(np.float32)
    valid, length = _binary_body(x, noisy)
    statuses = set()
    with server(noisy_guard) as (client, _):
        @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=4),
               st.one_of(st.just(len(valid)), st.integers(0, len(valid))), st.one_of(st.just(0), st.integers(-3, 3)))
        def fuzz(flips, cut, shift):
            content = bytearray(valid[:max(cut, 1)])
            for at, value in flips:
                if at < len(content):
                    content[at] = value
            response = client.post(INFER, content=bytes(content), headers=_header(max(length + shift, 0)))
            statuses.add(response.status_code)
            assert response.status_code in (200, 400), response.text
            if response.status_code == 400:
                assert "\n" not in response.json()["error"]

        fuzz()
        assert client.get("/v2/health/live").status_code == 200
    assert {200, 400} <= statuses


def test_v2_is_behind_the_same_protection_as_v1(th, noisy_guard, digits_test):
    """With a token, only the v2 probes are open; tritonclient passes the token as a header. Without one,
    the server metadata withholds the software version, as /v1/info does."""
    token = "t" * 32
    x, noisy = digits_test.logits[:5].astype(np.float32), digits_test.noisy_logits[:5].astype(np.float32)
    with server(noisy_guard, token=token) as (client, url):
        assert client.get("/v2/health/live").status_code == 200 and client.get("/v2/health/ready").status_code == 200
        for path in ("/v2", "/v2/models/logitguard", "/v2/models/logitguard/ready"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.json() == {"error": "unauthorized"}, path
        triton = th.InferenceServerClient(url)
        with pytest.raises(th.InferenceServerException) as unauthorized:
            triton.infer("logitguard", triton_inputs(th, x, noisy, binary=True))
        assert unauthorized.value.status() == "401"
        bearer = {"Authorization": f"Bearer {token}"}
        result = triton.infer("logitguard", triton_inputs(th, x, noisy, binary=True), headers=bearer)
        assert_outputs_match({n: result.as_numpy(n) for n in ALL_OUTPUTS}, noisy_guard, x, noisy)
        assert triton.get_server_metadata(headers=bearer)["version"] != "withheld"
    with server(noisy_guard) as (client, _):
        assert client.get("/v2").json()["version"] == "withheld"


def test_a_json_header_is_counted_before_it_is_parsed(noisy_guard):
    """Parsing costs memory in proportion to the row limit, not to the body: a header holding more numbers
    than max_rows rows of logits and noise queries is refused from its bytes alone."""
    with server(noisy_guard, max_rows=5) as (client, _):
        many = {"inputs": [{"name": "logits", "datatype": "FP32", "shape": [5, 10], "data": [0] * 5000}]}
        response = client.post(INFER, json=many)
        assert response.status_code == 400 and "more numbers than this server takes" in response.json()["error"]
        fits = {"inputs": [{"name": "logits", "datatype": "FP32", "shape": [5, 10], "data": [0.5] * 50},
                           {"name": "noisy_logits", "datatype": "FP32", "shape": [5, 3, 10], "data": [0.5] * 150}],
                "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in ALL_OUTPUTS]}
        assert client.post(INFER, json=fits).status_code == 200
