"""The HTTP service (`logitguard.serve`): a real uvicorn server on a free loopback port.

Answers must equal `Guard.check` in-process (JSON and Arrow, on digits and on the embedded Fashion-MNIST
guard); every kind of bad request gets its own 4xx with a clear message and the server goes on; health,
info and metrics say what they should; the drift watch stays quiet on clean traffic and alerts on an
attack; a schema-driven fuzz (schemathesis) and a byte-level Arrow fuzz find no 5xx.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from logitguard.cli import main
from logitguard.defenses.decision import ABSTAIN
from logitguard.defenses.guard import Guard
from logitguard.evaluation.guard import fit_guard, guard_from_pipeline
from logitguard.serve import create_app, serve_in_thread
from logitguard.serve.codec import ARROW_STREAM, JSON
from logitguard.serve.drift import DriftWatch
from logitguard.tables import read_table

DATA = Path(__file__).resolve().parents[1] / "data"
ARROW = {"content-type": ARROW_STREAM}


# -- helpers -------------------------------------------------------------------------------------


@contextmanager
def server(guard: Guard, **limits):
    """A real uvicorn server for `guard` on a free loopback port; yields (client, app)."""
    app = create_app(guard, **limits)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app


def arrow_body(logits: np.ndarray, noisy: np.ndarray | None = None, *, layout: str = "fixed", **extra) -> bytes:
    """An Arrow IPC stream (two record batches) of logits (N, C) and noise queries (N, K, C).

    layout: ``fixed`` (fixed_size_list logits, K fixed lists of C), ``list`` (variable lists, nested),
    ``flat`` (variable-list logits, flat K*C noise queries).
    """
    n, c = logits.shape

    def lists(values: np.ndarray, size: int, fixed: bool) -> pa.Array:
        flat = pa.array(values.ravel())
        if fixed:
            return pa.FixedSizeListArray.from_arrays(flat, size)
        return pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, size, dtype=np.int32)), flat)

    columns = {"logits": lists(logits, c, layout == "fixed")}
    if noisy is not None:
        k = noisy.shape[1]
        if layout == "flat":
            columns["noisy_logits"] = lists(noisy, k * c, False)
        else:
            columns["noisy_logits"] = lists(noisy, c, layout == "fixed")
            columns["noisy_logits"] = (pa.FixedSizeListArray.from_arrays(columns["noisy_logits"], k) if layout == "fixed"
                                       else pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                                                     columns["noisy_logits"]))
    columns |= extra
    table = pa.table(columns)
    return write_stream(table.to_batches(max_chunksize=max(1, (n + 1) // 2)), table.schema)


def write_stream(batches, schema, **options) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def json_body(logits: np.ndarray, noisy: np.ndarray | None = None) -> dict:
    body = {"logits": np.asarray(logits, np.float64).tolist()}
    if noisy is not None:
        body["noisy_logits"] = np.asarray(noisy, np.float64).tolist()
    return body


def assert_json_matches(results: list[dict], guard: Guard, logits, noisy=None) -> None:
    """Every field of the JSON results equals `guard.check` in-process (scores to 1e-9: the service may decide
    a request's rows in a batch with others, another shape for the BLAS kernels)."""
    expected = guard.check(logits, noisy)
    got = {key: [r[key] for r in results] for key in results[0]}
    assert len(results) == len(logits)
    np.testing.assert_array_equal(got["model_label"], expected.model_label)
    np.testing.assert_array_equal(got["flagged"], expected.flagged)
    np.testing.assert_allclose(np.array(got["score"], dtype=float), expected.score, rtol=1e-9, atol=1e-12)
    abstained = expected.label == ABSTAIN
    np.testing.assert_array_equal(got["abstained"], abstained)
    np.testing.assert_array_equal([-1 if v is None else v for v in got["label"]], expected.label)
    names = guard.class_names
    assert got["class"] == [None if a else names[v] for a, v in zip(abstained, expected.label)]
    assert got["model_class"] == [names[v] for v in expected.model_label]


def assert_arrow_matches(content: bytes, guard: Guard, logits, noisy=None) -> None:
    expected = guard.check(logits, noisy)
    table = pa.ipc.open_stream(content).read_all()
    assert table.column_names == ["model_label", "flagged", "score", "label"]
    np.testing.assert_array_equal(table["model_label"].to_numpy(), expected.model_label)
    np.testing.assert_array_equal(table["flagged"].to_numpy(), expected.flagged)
    np.testing.assert_allclose(table["score"].to_numpy(), expected.score, rtol=1e-9, atol=1e-12)  # null reads as NaN
    label = table["label"].to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(np.where(np.isnan(label), ABSTAIN, label), expected.label)
    assert table["label"].null_count == int((expected.label == ABSTAIN).sum())


def metrics(client: httpx.Client) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from /metrics."""
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_server(noisy_guard):
    with server(noisy_guard, max_rows=2000) as running:
        yield running


@pytest.fixture(scope="module")
def fashion():
    """The embedded guard (ln-reject, C=10, K=8) and 300 rows of its test split (clean, FGSM, PGD)."""
    guard = guard_from_pipeline(DATA / "defenses" / "defenses.json", "ln-reject", DATA / "fashion-mnist")
    test = read_table(DATA / "fashion-mnist", split="test")
    return guard, test


# -- answers equal Guard.check -------------------------------------------------------------------


def test_json_answers_equal_guard_check_on_digits(noisy_server, noisy_guard, digits_test):
    client, _ = noisy_server
    x, noisy = digits_test.logits, digits_test.noisy_logits
    response = client.post("/v1/check", json=json_body(x, noisy))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rows"] == len(x)
    assert_json_matches(body["results"], noisy_guard, x, noisy)
    assert any(r["abstained"] for r in body["results"]) and not all(r["flagged"] for r in body["results"])


@pytest.mark.parametrize("layout", ["fixed", "list", "flat"])
def test_arrow_answers_equal_guard_check_on_digits(noisy_server, noisy_guard, digits_test, layout):
    client, _ = noisy_server
    x, noisy = digits_test.logits, digits_test.noisy_logits
    if layout == "list":  # float32 values: the guard sees what the client sent
        x, noisy = x.astype(np.float32), noisy.astype(np.float32)
    response = client.post("/v1/check.arrow", content=arrow_body(x, noisy, layout=layout), headers=ARROW)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == ARROW_STREAM
    assert_arrow_matches(response.content, noisy_guard, x, noisy)


def test_a_guard_without_noise_answers_and_ignores_noise_queries(plain_guard, digits_test):
    x = digits_test.logits[:300]
    with server(plain_guard) as (client, _):
        response = client.post("/v1/check", json=json_body(x, digits_test.noisy_logits[:300]))
        assert response.status_code == 200, response.text
        assert_json_matches(response.json()["results"], plain_guard, x)
        arrow = client.post("/v1/check.arrow", content=arrow_body(x), headers=ARROW)
        assert arrow.status_code == 200, arrow.text
        assert_arrow_matches(arrow.content, plain_guard, x)
        assert all(r["label"] is not None for r in response.json()["results"])  # on_flag correct: no abstention


def test_a_guard_without_detector_has_null_scores_and_no_drift_test(digits_split_table, digits_test):
    guard = fit_guard(digits_split_table, detector=None, corrector="svm", on_flag="correct")
    x = digits_test.logits[:50]
    with server(guard) as (client, _):
        results = client.post("/v1/check", json=json_body(x)).json()["results"]
        assert_json_matches(results, guard, x)
        assert all(r["score"] is None and r["flagged"] for r in results)  # a corrector alone acts on every row
        arrow = client.post("/v1/check.arrow", content=arrow_body(x), headers=ARROW)
        assert pa.ipc.open_stream(arrow.content).read_all()["score"].null_count == len(x)
        drift = client.get("/v1/info").json()["drift"]
        assert drift["applicable"] is False and "not applicable" in drift["reason"]
        assert metrics(client)[("logitguard_drift_applicable", ())] == 0


def test_the_embedded_fashion_guard_answers_as_in_process(fashion):
    guard, test = fashion
    rows = np.concatenate([np.flatnonzero(test.attack == a)[:100] for a in ("clean", "fgsm", "pgd")])
    x, noisy = test.logits[rows], test.noisy_logits[rows]  # float32, as the producer wrote them
    assert (guard.num_classes, guard.num_queries) == (10, 8)
    with server(guard) as (client, _):
        response = client.post("/v1/check", json=json_body(x, noisy))
        assert response.status_code == 200, response.text
        assert_json_matches(response.json()["results"], guard, x, noisy)
        arrow = client.post("/v1/check.arrow", content=arrow_body(x, noisy), headers=ARROW)
        assert arrow.status_code == 200, arrow.text
        assert_arrow_matches(arrow.content, guard, x, noisy)
        flagged = np.array([r["flagged"] for r in response.json()["results"]])
        assert flagged[:100].mean() < 0.1 < 0.5 < flagged[200:].mean()  # clean mostly passes, PGD mostly flagged


# -- bad requests --------------------------------------------------------------------------------


def _bad_requests(x: np.ndarray, noisy: np.ndarray) -> list[tuple[str, dict, int, str]]:
    """(id, httpx request kwargs, status, message fragment) for every kind of bad request (C=10, K=3)."""
    def raw(text: str, kind: str = JSON) -> dict:
        return {"content": text.encode(), "headers": {"content-type": kind}}

    row = ", ".join(["1.0"] * 9)
    ragged = pa.ListArray.from_arrays(pa.array([0, 10, 19], pa.int32()), pa.array(np.ones(19)))
    strings = pa.array([["a"] * 10])
    nulls = pa.array([[1.0] * 9 + [None]], pa.list_(pa.float64()))
    one = pa.array([[1.0] * 10], pa.list_(pa.float64()))
    return [
        ("wrong-C-json", {"json": json_body(x[:2, :9], noisy[:2, :, :9])}, 422, "expected 10"),
        ("wrong-C-arrow", {"content": arrow_body(x[:2, :9], noisy[:2, :, :9]), "headers": ARROW}, 422, "expected 10"),
        ("wrong-K-json", {"json": json_body(x[:2], noisy[:2, :2])}, 422, "expected 3"),
        ("wrong-K-arrow-flat", {"content": arrow_body(x[:2], noisy[:2, :2], layout="flat"), "headers": ARROW}, 422,
         "expected 3"),
        ("missing-noise", {"json": json_body(x[:2])}, 422, "noisy_logits is required"),
        ("missing-noise-arrow", {"content": arrow_body(x[:2]), "headers": ARROW}, 422, "noisy_logits is required"),
        ("noise-rows-differ", {"json": json_body(x[:2], noisy[:3])}, 422, "noisy_logits has 3 rows"),
        ("nan-token", raw(f'{{"logits": [[NaN, {row}]]}}'), 422, "finite number"),
        ("infinity-token", raw(f'{{"logits": [[-Infinity, {row}]]}}'), 422, "finite number"),
        ("overflowing-number", raw(f'{{"logits": [[1e999, {row}]]}}'), 422, "finite number"),
        ("nan-arrow", {"content": arrow_body(np.where(np.eye(2, 10) > 0, np.nan, x[:2]), noisy[:2]), "headers": ARROW},
         422, "NaN or infinite"),
        ("beyond-float32", {"json": json_body(np.where(np.eye(2, 10) > 0, 1e300, x[:2].astype(float)), noisy[:2])}, 422,
         "float32's range"),
        ("ragged-json", raw(f'{{"logits": [[{row}, 1.0], [{row}]]}}'), 422, "logits is ragged: logits[1] has 9"),
        ("ragged-noise-json", {"json": {"logits": x[:1].tolist(), "noisy_logits": [[[1.0] * 10, [1.0] * 10, [1.0] * 9]]}},
         422, "noisy_logits is ragged: noisy_logits[0][2] has 9"),
        ("ragged-arrow", {"content": write_stream([pa.record_batch({"logits": ragged})], pa.schema([("logits", ragged.type)])),
                          "headers": ARROW}, 422, "logits is ragged: row 1 has 9"),
        ("empty-json", raw('{"logits": []}'), 422, "empty batch"),
        ("empty-arrow", {"content": write_stream([], pa.schema([("logits", pa.list_(pa.float64()))])), "headers": ARROW},
         422, "empty batch"),
        ("too-many-rows-json", {"json": json_body(x[:6], noisy[:6])}, 422, "limit of 5 rows"),
        ("too-many-rows-arrow", {"content": arrow_body(x[:6], noisy[:6]), "headers": ARROW}, 422, "limit of 5 rows"),
        ("body-too-large", {"json": json_body(x[:5], np.repeat(noisy[:5], 30, axis=1))}, 413, "limit of 8192 bytes"),
        ("body-too-large-chunked", {"content": iter([b" " * 4096] * 4), "headers": {"content-type": JSON}}, 413,
         "limit of 8192 bytes"),
        ("wrong-content-type", raw('{"logits": [[1, 2]]}', "text/plain"), 415, "takes 'application/json'"),
        ("no-content-type", {"content": b'{"logits": [[1, 2]]}'}, 415, "content type 'missing'"),
        ("arrow-to-json-endpoint", {"content": arrow_body(x[:1], noisy[:1]), "headers": {"content-type": JSON}}, 400,
         "malformed JSON"),
        ("malformed-json", raw('{"logits": [[1, 2]'), 400, "malformed JSON"),
        ("json-not-an-object", raw("[[1, 2]]"), 422, "should be an object"),
        ("unknown-field", {"json": {**json_body(x[:1], noisy[:1]), "noisy": 1}}, 422, "noisy: unknown field"),
        ("strings-json", raw(f'{{"logits": [["1.0", {row}]]}}'), 422, "logits[0][0]: Input should be a valid number"),
        ("booleans-json", raw(f'{{"logits": [[true, {row}]]}}'), 422, "logits[0][0]: Input should be a valid number"),
        ("malformed-arrow", {"content": b"\x00\x01garbage" * 10, "headers": ARROW}, 400, "malformed Arrow IPC stream"),
        ("arrow-file-not-stream", {"content": b"ARROW1\x00\x00" + b"\x00" * 64, "headers": ARROW}, 400, "IPC stream"),
        ("compressed-arrow", {"content": write_stream([pa.record_batch({"logits": one})], pa.schema([("logits", one.type)]),
                                                      compression="zstd"), "headers": ARROW}, 415, "uncompressed"),
        ("extra-column", {"content": arrow_body(x[:1], noisy[:1], id=pa.array([7])), "headers": ARROW}, 422,
         "columns ['logits', 'noisy_logits', 'id']"),
        ("no-logits-column", {"content": write_stream([pa.record_batch({"noisy_logits": one})],
                                                      pa.schema([("noisy_logits", one.type)])), "headers": ARROW},
         422, "it takes 'logits'"),
        ("string-values", {"content": write_stream([pa.record_batch({"logits": strings})],
                                                   pa.schema([("logits", strings.type)])), "headers": ARROW}, 422,
         "logits must be a list of C numbers per row; got type list<item: string>"),
        ("null-values", {"content": write_stream([pa.record_batch({"logits": nulls})], pa.schema([("logits", nulls.type)])),
                         "headers": ARROW}, 422, "null values"),
        ("offsets-out-of-bounds", {"content": _lying_offsets(), "headers": ARROW}, 400, "malformed Arrow IPC stream"),
    ]


def _lying_offsets() -> bytes:
    """A stream whose list offsets point a million values past the end of its values buffer."""
    good = pa.array([[1.0] * 37], pa.list_(pa.float64()))
    body = write_stream([pa.record_batch({"logits": good})], pa.schema([("logits", good.type)]))
    at = body.rindex(np.array([0, 37], np.int32).tobytes())  # the offsets buffer: the last match
    return body[:at + 4] + np.int32(10**6).tobytes() + body[at + 8:]


@pytest.fixture(scope="module")
def strict_server(noisy_guard):
    """The K=3 guard behind tight limits: 5 rows, 8 KiB bodies."""
    with server(noisy_guard, max_rows=5, max_body_bytes=8192) as running:
        yield running


@pytest.mark.parametrize("name", [case[0] for case in _bad_requests(np.ones((6, 10)), np.ones((6, 3, 10)))])
def test_each_bad_request_gets_its_own_status_and_message(strict_server, digits_test, name):
    client, _ = strict_server
    cases = {case[0]: case[1:] for case in _bad_requests(digits_test.logits[:6], digits_test.noisy_logits[:6])}
    request, status, fragment = cases[name]
    endpoint = "/v1/check.arrow" if request.get("headers") == ARROW else "/v1/check"
    response = client.post(endpoint, **request)
    assert response.status_code == status, (name, response.text)
    detail = response.json()["detail"]
    assert fragment in detail, (name, detail)
    assert "Traceback" not in response.text and "\n" not in detail
    assert client.get("/v1/health").json()["status"] == "ok"  # still answering


def test_an_unexpected_error_is_a_logged_generic_500_and_the_server_goes_on(noisy_guard, digits_test, caplog):
    broken = copy.copy(noisy_guard)

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals at 0xdeadbeef")

    broken.check = explode
    with server(broken) as (client, _):
        response = client.post("/v1/check", json=json_body(digits_test.logits[:2], digits_test.noisy_logits[:2]))
        assert response.status_code == 500
        assert response.json() == {"detail": "internal server error; the error was logged"}
        assert "secret" not in response.text and "Traceback" not in response.text
        assert client.get("/v1/health").status_code == 200
        assert metrics(client)[("logitguard_requests_total", (("endpoint", "/v1/check"), ("status", "500")))] == 1
    assert any("secret internals" in r.getMessage() or (r.exc_info and "secret" in str(r.exc_info[1]))
               for r in caplog.records)


def test_checking_runs_off_the_event_loop(noisy_guard, digits_test):
    """A slow check must not hold up other requests (it runs in the threadpool)."""
    slow = copy.copy(noisy_guard)

    def sleepy(*args, **kwargs):
        time.sleep(1.5)
        return noisy_guard.check(*args, **kwargs)

    slow.check = sleepy
    with server(slow) as (client, _):
        body = json_body(digits_test.logits[:1], digits_test.noisy_logits[:1])
        worker = threading.Thread(target=client.post, args=("/v1/check",), kwargs={"json": body})
        worker.start()
        time.sleep(0.2)
        started = time.perf_counter()
        assert client.get("/v1/health").status_code == 200
        assert time.perf_counter() - started < 0.75
        worker.join()


# -- health, info, metrics -----------------------------------------------------------------------


def test_keep_alive_requests_are_not_held_back_by_nagle(noisy_server):
    """Responses on a reused connection come at once (TCP_NODELAY), not after the client's ~40 ms delayed ACK."""
    client, _ = noisy_server
    times = []
    for _ in range(15):
        started = time.perf_counter()
        client.get("/v1/health")
        times.append(time.perf_counter() - started)
    assert np.median(times) < 0.02, times


def test_health_info_and_openapi_describe_the_guard(noisy_server, noisy_guard, fashion):
    client, _ = noisy_server
    assert client.get("/v1/health").json() == {"status": "ok"}  # open to probes: says nothing about the guard
    info = client.get("/v1/info").json()
    detector = noisy_guard.defense.detector
    assert info["classes"] == [f"digit-{i}" for i in range(10)]
    assert (info["num_classes"], info["num_queries"], info["on_flag"]) == (10, 3, "reject")
    assert info["detector"]["kind"] == "learned-noisy"
    assert info["detector"]["threshold"] == detector.threshold_ and info["detector"]["fpr"] == 0.01
    assert info["detector"]["achieved_fpr"] == detector.achieved_fpr_
    assert set(info["unmeasured"]) == {"oblivious", "transfer", "query", "surrogate", "adaptive"}  # digits: no budgets
    assert info["server"]["max_rows"] == 2000 and info["server"]["max_body_bytes"] == 64 * 2**20
    assert info["drift"]["applicable"] is True and info["drift"]["window"] == 1000
    spec = client.get("/openapi.json").json()
    request = spec["paths"]["/v1/check"]["post"]["requestBody"]["content"][JSON]["schema"]
    assert request["properties"]["logits"]["items"]["minItems"] == 10
    assert request["properties"]["noisy_logits"]["anyOf"][0]["items"]["maxItems"] == 3
    assert request["required"] == ["logits", "noisy_logits"]
    assert "CheckResponse" in spec["components"]["schemas"] and "/v1/check.arrow" in spec["paths"]

    guard, _ = fashion  # the embedded guard carries threat figures
    with server(guard) as (fashion_client, _):
        info = fashion_client.get("/v1/info").json()
    assert (info["num_classes"], info["num_queries"], info["on_flag"]) == (10, 8, "reject")
    assert info["detector"]["achieved_fpr"] == pytest.approx(guard.defense.detector.achieved_fpr_)
    rows = {(r["threat_model"], round(r["eps"] * 255)): r for r in info["threat"] if r["pipeline"] == "guard"}
    assert {("oblivious", 8), ("transfer", 8)} <= set(rows)
    assert all(0 <= r["robust_accuracy"] <= 1 and r["samples"] > 0 for r in rows.values())
    assert info["provenance"]["settings"]["pipeline"] == "ln-reject"


def test_metrics_count_requests_rows_flags_and_latency(plain_guard, noisy_guard, digits_test):
    x, noisy = digits_test.logits[:200], digits_test.noisy_logits[:200]
    expected = noisy_guard.check(x, noisy)
    with server(noisy_guard) as (client, _):
        before = metrics(client)
        assert before[("logitguard_rows_checked_total", ())] == 0
        assert client.post("/v1/check", json=json_body(x, noisy)).status_code == 200
        assert client.post("/v1/check.arrow", content=arrow_body(x, noisy), headers=ARROW).status_code == 200
        assert client.post("/v1/check", json={"logits": []}).status_code == 422
        after = metrics(client)
        requests = lambda endpoint, status: after.get(  # noqa: E731
            ("logitguard_requests_total", (("endpoint", endpoint), ("status", status))), 0)
        assert requests("/v1/check", "200") == 1 and requests("/v1/check.arrow", "200") == 1
        assert requests("/v1/check", "422") == 1
        assert after[("logitguard_rows_checked_total", ())] == 400
        assert after[("logitguard_rows_flagged_total", ())] == 2 * expected.flagged.sum() > 0
        assert after[("logitguard_rows_abstained_total", ())] == 2 * (expected.label == ABSTAIN).sum()
        assert after[("logitguard_flagged_rate", ())] == pytest.approx(expected.flagged.mean())
        assert after[("logitguard_request_duration_seconds_count", (("endpoint", "/v1/check"),))] == 2
        assert after[("logitguard_drift_window_rows", ())] == 400
        assert after[("logitguard_drift_flagged_rate", ())] == pytest.approx(expected.flagged.mean())
        for gauge in ("applicable", "alert", "expected_rate", "binomial_pvalue", "ks_statistic", "ks_pvalue"):
            assert ("logitguard_drift_" + gauge, ()) in after
        client.get("/no/such/path")
        assert ("logitguard_requests_total", (("endpoint", "other"), ("status", "404"))) in metrics(client)
    with server(plain_guard) as (client, _):
        client.post("/v1/check", json=json_body(x))
        assert metrics(client)[("logitguard_drift_applicable", ())] == 1  # msp is a detector too


# -- drift ---------------------------------------------------------------------------------------


def test_drift_stays_quiet_on_clean_traffic_and_alerts_on_an_attack(fashion):
    guard, test = fashion
    clean, pgd = np.flatnonzero(test.attack == "clean"), np.flatnonzero(test.attack == "pgd")
    with server(guard, drift_window=500) as (client, _):
        for start in range(0, 2000, 500):  # every clean test row, a window at a time
            rows = clean[start:start + 500]
            body = arrow_body(test.logits[rows], test.noisy_logits[rows])
            assert client.post("/v1/check.arrow", content=body, headers=ARROW).status_code == 200
            drift = client.get("/v1/info").json()["drift"]
            assert drift["rows"] == 500 and not drift["alert"], drift
            assert drift["binomial_pvalue"] > 1e-3
        assert metrics(client)[("logitguard_drift_alert", ())] == 0
        rows = pgd[:500]
        client.post("/v1/check.arrow", content=arrow_body(test.logits[rows], test.noisy_logits[rows]), headers=ARROW)
        drift = client.get("/v1/info").json()["drift"]
        assert drift["alert"] and drift["flagged_rate"] > 0.5 and drift["binomial_pvalue"] < 1e-10
        assert drift["ks_pvalue"] < 1e-10 and drift["rows_seen"] == 2500
        assert metrics(client)[("logitguard_drift_alert", ())] == 1


def test_drift_flags_a_rate_that_departs_from_the_calibrated_fpr():
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=5000)
    for rate, alert in ((0.01, False), (0.05, True), (0.0, True)):  # silence is a departure too
        watch = DriftWatch(0.01, calibration, window=2000)
        watch.update(rng.random(2000) < rate, rng.normal(size=2000))
        status = watch.status()
        assert status["alert"] is alert, (rate, status)
        assert status["flagged_rate"] == pytest.approx(rate, abs=0.006)
    # a flagged rate near the FPR with few rows is not enough to alert
    small = DriftWatch(0.01, calibration, window=1000, min_rows=100)
    small.update(np.ones(50, bool), np.zeros(50))
    assert small.status()["binomial_pvalue"] < 1e-50 and not small.status()["alert"]


def test_drift_ks_compares_window_scores_with_calibration_scores():
    rng = np.random.default_rng(1)
    watch = DriftWatch(0.05, rng.normal(size=3000), window=1000)
    watch.update(np.zeros(1000, bool), rng.normal(size=1000))
    same = watch.status()
    watch.update(np.zeros(1000, bool), rng.normal(1.0, 1.0, size=1000))
    shifted = watch.status()
    assert same["ks_pvalue"] > 1e-3 and shifted["ks_pvalue"] < 1e-20 and shifted["ks_statistic"] > 0.3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.integers(1, 30))
def test_the_ring_buffer_keeps_exactly_the_last_window_rows(sizes, window):
    rng = np.random.default_rng(sum(sizes) + window)
    watch = DriftWatch(0.1, np.arange(10.0), window=window, min_rows=1)
    naive: deque = deque(maxlen=window)
    for n in sizes:
        flags, scores = rng.random(n) < 0.3, rng.normal(size=n)
        watch.update(flags, scores)
        naive.extend(zip(flags, scores))
    status = watch.status()
    assert status["rows"] == len(naive) and status["rows_seen"] == sum(sizes)
    assert status["flagged"] == sum(f for f, _ in naive)
    kept = np.sort(watch._scores[:status["rows"]])
    np.testing.assert_array_equal(kept, np.sort([s for _, s in naive]))


def test_drift_is_not_applicable_without_a_detector_and_floors_a_zero_fpr():
    none = DriftWatch.for_detector(None)
    none.update(np.ones(5, bool), np.full(5, np.nan))
    assert none.status() == {"applicable": False, "alert": False, "reason": none.status()["reason"]}
    assert "no detector" in none.status()["reason"]
    # zero flags among 99 calibration rows bound the clean rate by 1/100, not 0: one flag is no alert
    zero = DriftWatch(0.0, np.arange(99.0), window=200, min_rows=1)
    zero.update(np.arange(200) == 0, np.zeros(200))
    assert zero.expected_rate == pytest.approx(0.01) and not zero.status()["alert"]


# -- fuzz ----------------------------------------------------------------------------------------


def test_schema_driven_fuzz_finds_no_server_error(plain_guard, noisy_guard):
    """schemathesis draws requests from the served OpenAPI spec, valid and invalid, and checks every answer
    against it: no 5xx, documented status codes and content types, responses matching their schemas, invalid
    requests refused. For the K=0 guard the spec says everything: every valid request must be accepted."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    @schemathesis.serializer(ARROW_STREAM)
    def raw_bytes(context, value):  # the spec calls an Arrow body "binary": send what was drawn
        return value if isinstance(value, bytes) else str(value).encode()

    seen: dict[str, set] = {}
    for guard in (plain_guard, noisy_guard):
        with server(guard, max_rows=4) as (client, _):
            schema = schemathesis.openapi.from_url(f"{client.base_url}/openapi.json")
            for operation in (result.ok() for result in schema.get_all_operations()):
                # Invalid data for the JSON endpoint; a "binary" Arrow body has no invalid form (see the byte fuzz).
                modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * (operation.path == "/v1/check")
                # A spec cannot say "as many noise rows as logits rows" nor what a valid Arrow stream is.
                excluded = [positive_data_acceptance] if guard.needs_noise or "arrow" in operation.path else []
                for mode in modes:
                    @settings(max_examples=20 if operation.method == "post" else 2, deadline=None, database=None,
                              suppress_health_check=list(HealthCheck))
                    @given(case=operation.as_strategy(generation_mode=mode))
                    def fuzz(case):
                        response = case.call(base_url=str(client.base_url))
                        seen.setdefault(operation.path, set()).add(response.status_code)
                        case.validate_response(response, excluded_checks=excluded)

                    fuzz()
    assert 200 in seen["/v1/check"] and 422 in seen["/v1/check"] and seen["/v1/check.arrow"] <= {200, 400, 415, 422}


def test_byte_level_arrow_fuzz_never_crashes_the_server(noisy_guard, digits_test):
    """Flip bytes of a valid Arrow stream: every answer is 200 or a 4xx, and the server keeps answering."""
    valid = arrow_body(digits_test.logits[:3], digits_test.noisy_logits[:3], layout="list")
    statuses = set()
    with server(noisy_guard) as (client, _):
        @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=6),
               st.one_of(st.just(len(valid)), st.integers(0, len(valid))))
        def fuzz(flips, cut):
            body = bytearray(valid[:max(cut, 1)])
            for at, value in flips:
                if at < len(body):
                    body[at] = value
            response = client.post("/v1/check.arrow", content=bytes(body), headers=ARROW)
            statuses.add(response.status_code)
            assert response.status_code in (200, 400, 415, 422), response.text

        fuzz()
        assert client.get("/v1/health").status_code == 200
    assert {200, 400} <= statuses


# -- the command line ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_logitguard_serve_runs_a_server_that_answers(plain_guard, digits_test, tmp_path):
    path = plain_guard.save(tmp_path / "guard.npz")
    port = _free_port()
    code = "import sys; from logitguard.cli import main; sys.argv[0] = 'logitguard'; main()"
    process = subprocess.Popen([sys.executable, "-c", code, "serve", str(path), "--port", str(port), "--max-rows", "7"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/v1/health")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        response = httpx.post(f"{url}/v1/check", json=json_body(digits_test.logits[:7]))
        assert_json_matches(response.json()["results"], plain_guard, digits_test.logits[:7])
        assert httpx.get(f"{url}/v1/info").json()["server"]["max_rows"] == 7
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_command_errors_and_warnings(plain_guard, tmp_path, monkeypatch):
    missing = CliRunner().invoke(main, ["serve", str(tmp_path / "nope.npz")])
    assert missing.exit_code == 1 and "Error: no such guard file" in missing.output

    path = plain_guard.save(tmp_path / "guard.npz")
    calls = []
    monkeypatch.setattr("logitguard.serve.running.run", lambda guard, **kw: calls.append((guard, kw)))
    monkeypatch.delenv("LOGITGUARD_TOKEN", raising=False)
    exposed = CliRunner().invoke(main, ["serve", str(path), "--host", "0.0.0.0", "--port", "9", "--max-body-mb", "0.5",
                                        "--no-auth"])
    assert exposed.exit_code == 0, exposed.output
    assert "warning: serving on 0.0.0.0 without authentication" in exposed.output
    options = calls[0][1]
    assert (options["host"], options["port"], options["max_body_bytes"], options["token"]) == ("0.0.0.0", 9, 2**19, None)
    assert options["no_auth"] and options["allowed_hosts"] is None and options["max_concurrency"] == 16
    quiet = CliRunner().invoke(main, ["serve", str(path)])
    assert quiet.exit_code == 0 and "warning" not in quiet.output and calls[1][1]["host"] == "127.0.0.1"
    assert calls[1][1]["allowed_hosts"] == ("localhost", "127.0.0.1", "[::1]")

    import logitguard.serve

    for module in [m for m in sys.modules if m.startswith("logitguard.serve.") or m.split(".")[0] == "fastapi"]:
        monkeypatch.delitem(sys.modules, module)
    for submodule in ("app", "running", "protection"):
        monkeypatch.delattr(logitguard.serve, submodule, raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the extra were not installed
    extra = CliRunner().invoke(main, ["serve", str(path)])
    assert extra.exit_code == 1
    assert "Error: the service needs the 'serve' extra: pip install 'logitguard[serve]'" in extra.output


def test_the_service_modules_do_not_import_torch():
    code = ("import sys, logitguard.serve.app, logitguard.serve.drift; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    drift_only = "import sys, logitguard.serve.drift; print('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", drift_only], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_info_is_strict_json(noisy_server):
    client, _ = noisy_server
    json.loads(client.get("/v1/info").text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
