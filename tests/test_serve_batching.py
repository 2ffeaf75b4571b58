"""Dynamic batching (`logitguard.serve.batching.MicroBatcher`): concurrent requests' rows are decided in one
call of the guard, each request gets exactly its own rows' decisions, a request the guard refuses fails
alone, and through the real server the answers equal `Guard.check` in-process."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from logitguard.defenses.apply import decide
from logitguard.errors import LogitguardError
from logitguard.serve import create_app, serve_in_thread
from logitguard.serve.batching import MicroBatcher


@pytest.fixture(scope="module")
def guard(noisy_guard):
    return noisy_guard  # learned-noisy, reject: K = 3 noise queries


@pytest.fixture(scope="module")
def test_rows(digits_test):
    return digits_test


def slow(guard, calls):
    """The guard's decision, slowed so that concurrent requests pile up, recording each call's rows."""
    def run(logits, noisy):
        calls.append(len(logits))
        time.sleep(0.05)
        return decide(guard, logits, noisy)
    return run


def test_concurrent_requests_share_calls_and_get_their_own_rows(guard, test_rows):
    calls: list[int] = []
    batcher = MicroBatcher(slow(guard, calls), max_rows=64)
    sizes = [1, 3, 1, 7, 2, 1, 5, 1, 1, 4, 2, 1, 1, 9, 1, 2]
    starts = np.cumsum([0, *sizes])
    requests = [(test_rows.logits[a:b], test_rows.noisy_logits[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    barrier = threading.Barrier(len(requests))

    def send(request):
        barrier.wait()
        return batcher(*request)

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(send, requests))
    for (logits, noisy), answer in zip(requests, answers):
        expected = guard.check(logits, noisy)
        for got, want in zip(answer, expected):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)  # row-wise: batch-mates change nothing
    assert sum(calls) == sum(sizes) and len(calls) < len(requests) / 2, calls
    assert max(calls) <= 64 and batcher.rows == sum(sizes) and batcher.batches == len(calls)


def test_a_refused_request_fails_alone(guard, test_rows):
    batcher = MicroBatcher(slow(guard, []), max_rows=4096)
    good = [(test_rows.logits[i:i + 2], test_rows.noisy_logits[i:i + 2]) for i in range(0, 12, 2)]
    bad = (test_rows.logits[:2], test_rows.noisy_logits[:2, :2])  # K = 2, the guard reads 3
    barrier = threading.Barrier(len(good) + 1)

    def send(request):
        barrier.wait()
        try:
            return batcher(*request)
        except LogitguardError as exc:
            return exc

    with ThreadPoolExecutor(len(good) + 1) as pool:
        answers = list(pool.map(send, [*good[:3], bad, *good[3:]]))
    assert isinstance(answers[3], LogitguardError) and "noise queries" in str(answers[3])
    for (logits, noisy), answer in zip(good, answers[:3] + answers[4:]):
        np.testing.assert_array_equal(answer.label, guard.check(logits, noisy).label)


def test_a_request_larger_than_a_batch_is_decided_alone(guard, test_rows):
    calls: list[int] = []
    batcher = MicroBatcher(slow(guard, calls), max_rows=4)
    answer = batcher(test_rows.logits[:10], test_rows.noisy_logits[:10])
    np.testing.assert_array_equal(answer.label, guard.check(test_rows.logits[:10], test_rows.noisy_logits[:10]).label)
    assert calls == [10]


def test_the_server_batches_concurrent_single_rows_and_answers_as_in_process(guard, test_rows):
    app = create_app(guard, max_batch_rows=256)
    logits, noisy = test_rows.logits[:48], test_rows.noisy_logits[:48]
    with serve_in_thread(app) as url, httpx.Client(base_url=url, limits=httpx.Limits(max_connections=16)) as client:
        def one(i):
            body = {"logits": logits[i:i + 1].tolist(), "noisy_logits": noisy[i:i + 1].tolist()}
            return client.post("/v1/check", json=body).json()["results"][0]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(len(logits))))
        info = client.get("/v1/info").json()
    expected = guard.check(logits, noisy)
    assert [r["model_label"] for r in results] == expected.model_label.tolist()
    assert [r["flagged"] for r in results] == expected.flagged.tolist()
    np.testing.assert_allclose([r["score"] for r in results], expected.score, rtol=1e-9)
    assert info["server"]["batching"] == {"max_rows": 256, "max_delay": 0.0}
    batcher = app.state.service.batcher
    assert batcher.rows == len(logits) and batcher.batches <= len(logits)
