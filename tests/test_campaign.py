"""The campaign watch (logitguard.serve.campaign): per-client streams of near-identical logits raise an alarm.

Real small data: the embedded Fashion-MNIST logits (train clean rows calibrate, test clean rows are the
benign traffic), and a query-attack-like stream built from one test row's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from logitguard.errors import LogitguardError
from logitguard.serve.campaign import CampaignWatch, centred, knn_distances
from logitguard.tables import read_table

DATA = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"
K, M = 4, 25  # neighbours, min_queries


@pytest.fixture(scope="module")
def logits():
    """(train clean logits (10000, 10), test clean logits (2000, 10))."""
    train = read_table(DATA, split="train", attacks=["clean"], columns=[]).logits
    test = read_table(DATA, split="test", attacks=["clean"], columns=[]).logits
    return train, test


@pytest.fixture(scope="module")
def calibrated(logits):
    return CampaignWatch.calibrate(logits[0], fpr=1e-3, neighbours=K, min_queries=M, window=1000)


def fresh(watch: CampaignWatch, **over) -> CampaignWatch:
    params = dict(window=watch.window, neighbours=watch.neighbours, min_queries=watch.min_queries)
    return CampaignWatch(watch.threshold, **{**params, **over})


def attack_like(row: np.ndarray, n: int, scale: float, seed: int = 0) -> np.ndarray:
    """(n, C): one image's logits under n tiny perturbations, as a query attack's stream gives them."""
    return row + np.random.default_rng(seed).normal(0.0, scale, (n, len(row)))


def test_calibration_is_deterministic_and_below_benign_distances(logits, calibrated):
    again = CampaignWatch.calibrate(logits[0], fpr=1e-3, neighbours=K, min_queries=M, window=1000)
    assert again.threshold == calibrated.threshold
    assert 0 < calibrated.threshold < calibrated.calibration["median_distance"] / 2
    # per-row bursts of one class are part of what it calibrates on: without them the threshold is no lower
    mixed = CampaignWatch.calibrate(logits[0], fpr=1e-3, neighbours=K, min_queries=M, by_class=False)
    assert mixed.threshold >= calibrated.threshold * 0.9


def test_benign_streams_raise_no_alarm(logits, calibrated):
    _, test = logits
    watch = fresh(calibrated)
    rng = np.random.default_rng(1)
    shuffled = test[rng.permutation(len(test))]
    for i in range(0, len(shuffled), 7):  # requests of 7 rows, one a second
        assert not watch.observe("random", shuffled[i:i + 7], now=float(i)).any()
    pred = test.argmax(axis=1)
    burst = np.concatenate([test[rng.permutation(np.flatnonzero(pred == c))] for c in range(10)])
    assert not watch.observe("bursts", burst, now=0.0).any()
    for c in range(10):  # every class as a client of its own, row by row
        rows = test[pred == c][:150]
        assert not any(watch.observe(f"class {c}", rows[i:i + 1], now=float(i)).any() for i in range(len(rows)))
    metrics = watch.metrics()
    assert metrics["alarms_total"] == 0 and metrics["clients_in_alarm"] == 0 and metrics["clients_tracked"] == 12
    near = watch.status("random")["clients"][0]["near_total"]
    assert near <= 10, near  # about fpr x 2000 = 2 expected


def test_query_attack_like_stream_alarms_within_a_bounded_number_of_queries(logits, calibrated):
    _, test = logits
    watch = fresh(calibrated)
    stream = attack_like(test[0], 300, scale=0.05)
    alarms = np.concatenate([watch.observe("attacker", stream[i:i + 1], now=float(i)) for i in range(len(stream))])
    # row K (0-based) is the first with K earlier rows, so the M-th near row is query K + M
    assert int(np.argmax(alarms)) + 1 == K + M
    assert alarms[K + M - 1:].all() and not alarms[:K + M - 1].any()
    status = watch.status()
    assert status["alarms_total"] == 1 and status["clients_in_alarm"] == 1
    assert status["clients"][0]["in_alarm"] and status["clients"][0]["window_near"] == 300 - K
    # larger random steps (the attacker's way under it) go unnoticed once they exceed the threshold
    loud = fresh(calibrated)
    assert not loud.observe("loud", attack_like(test[0], 300, scale=calibrated.threshold)).any()


def test_one_request_equals_row_by_row_and_a_brute_force_reference(logits, calibrated):
    _, test = logits
    rng = np.random.default_rng(2)
    mixed = np.concatenate([test[:150], attack_like(test[3], 120, 0.05), test[150:300]])[rng.permutation(420)]
    stream = np.concatenate([mixed, attack_like(test[5], 200, 0.05, seed=1)])
    small = dict(window=100, min_queries=10)
    whole = fresh(calibrated, **small).observe("c", stream, now=0.0)
    watch = fresh(calibrated, **small)
    cuts = np.sort(rng.choice(np.arange(1, len(stream)), 40, replace=False))
    pieces = np.concatenate([watch.observe("c", part, now=0.0) for part in np.split(stream, cuts)])
    np.testing.assert_array_equal(whole, pieces)
    # brute force: every row against the 100 rows before it
    space = centred(stream).astype(np.float64)
    ref = np.full(len(space), np.inf)
    for i in range(K, len(space)):
        d = np.linalg.norm(space[max(0, i - 100):i] - space[i], axis=1)
        ref[i] = np.sort(d)[:K].mean()
    got = knn_distances(centred(stream), 0, 100, K)
    np.testing.assert_allclose(got[K:], ref[K:], rtol=1e-4, atol=1e-3)
    assert np.isinf(got[:K]).all()
    near = ref < calibrated.threshold
    count = np.array([near[max(0, i - 99):i + 1].sum() for i in range(len(near))])
    np.testing.assert_array_equal(whole, count >= 10)
    assert whole.any() and not whole.all()


def test_alarms_end_when_near_queries_leave_the_window_or_the_horizon(logits, calibrated):
    _, test = logits
    watch = fresh(calibrated, window=200)
    assert watch.observe("c", attack_like(test[0], 60, 0.05), now=0.0)[-1]
    after = watch.observe("c", test[:200], now=1.0)
    assert after[0] and not after[-1] and watch.metrics()["clients_in_alarm"] == 0
    # spaced beyond the horizon, the same stream never alarms
    spaced = fresh(calibrated, horizon=10.0)
    stream = attack_like(test[0], 60, 0.05)
    assert not any(spaced.observe("slow", stream[i:i + 1], now=11.0 * i).any() for i in range(len(stream)))
    close = fresh(calibrated, horizon=10.0)
    assert any(close.observe("fast", stream[i:i + 1], now=0.1 * i).any() for i in range(len(stream)))


def test_lru_bounds_clients_and_memory(logits, calibrated):
    _, test = logits
    window, clients, cap = 50, 30, 8
    watch = fresh(calibrated, window=window, max_clients=cap, min_queries=10)
    for i in range(clients):
        watch.observe(f"client {i}", test[i * 60:(i + 1) * 60], now=float(i))  # 60 rows: more than the window
    metrics = watch.metrics()
    assert metrics["clients_tracked"] == cap and metrics["clients_evicted_total"] == clients - cap
    c = test.shape[1]
    assert watch.nbytes() <= cap * window * (4 * c + 8 + 3)
    assert watch.nbytes() >= cap * window * 4 * c  # each kept client holds a full window
    assert watch.status("client 0")["clients"] == []  # least recently seen: dropped
    assert watch.status(f"client {clients - 1}")["clients"][0]["window_rows"] == window


def test_status_is_json_and_hides_client_ids(logits, calibrated):
    _, test = logits
    watch = fresh(calibrated)
    secret = "10.1.2.3 token-abcdef"
    watch.observe(secret, attack_like(test[0], 40, 0.05), flagged=np.arange(40) % 4 == 0,
                  abstained=np.zeros(40, bool), now=0.0)
    watch.observe(secret, attack_like(test[0], 40, 0.05, seed=3), now=4.0)
    text = json.dumps(watch.status())
    assert secret not in text and "10.1.2.3" not in text
    summary = watch.status()["clients"][0]
    assert summary["queries"] == 80 and summary["flagged_rate"] == pytest.approx(10 / 80)
    assert summary["rate_per_s"] == pytest.approx(79 / 4.0) and len(summary["client"]) == 12


@pytest.mark.parametrize("params", [
    dict(threshold=0.0), dict(threshold=float("nan")), dict(threshold=-1.0), dict(threshold="1"),
    dict(window=1), dict(window=10.5), dict(neighbours=0), dict(neighbours=True), dict(neighbours=1000),
    dict(min_queries=0), dict(min_queries=1001), dict(max_clients=0), dict(horizon=0.0), dict(horizon=float("inf")),
    dict(horizon="10"),
])
def test_bad_parameters_are_refused(params):
    with pytest.raises(LogitguardError, match="campaign watch"):
        CampaignWatch(**{"threshold": 1.0, **params})


@pytest.mark.parametrize("call", [
    lambda w, z: w.observe("", z), lambda w, z: w.observe(7, z), lambda w, z: w.observe("c", z[0]),
    lambda w, z: w.observe("c", z[:0]), lambda w, z: w.observe("c", np.where(z == z[0, 0], np.nan, z)),
    lambda w, z: w.observe("c", z, flagged=np.zeros(3, bool)), lambda w, z: w.observe("c", z[:, :5]),
    lambda w, z: CampaignWatch.calibrate(z, fpr=0.0), lambda w, z: CampaignWatch.calibrate(z, fpr=0.5),
    lambda w, z: CampaignWatch.calibrate(z[:100], fpr=1e-3),
])
def test_bad_input_is_refused(logits, call):
    watch = CampaignWatch(1.0)
    watch.observe("c", logits[1][:10], now=0.0)  # fixes C = 10
    with pytest.raises(LogitguardError, match="campaign watch"):
        call(watch, logits[1][:20])


# -- in the service ------------------------------------------------------------------------------


def test_the_service_watches_each_client_and_blocks_an_attack_stream(logits, calibrated):
    """Through the real server: a client replaying one image's near-identical logits raises the alarm (in
    /v1/info and /metrics) and, with campaign_block, gets 429 instead of answers; benign rows do not."""
    import httpx

    from logitguard.evaluation.guard import guard_from_pipeline
    from logitguard.serve import create_app, serve_in_thread

    data = Path(__file__).resolve().parents[1] / "data"
    guard = guard_from_pipeline(data / "defenses" / "defenses.json", "ln-reject", data / "fashion-mnist")
    test = read_table(data / "fashion-mnist", split="test", attacks="clean")
    app = create_app(guard, campaign=fresh(calibrated), campaign_block=True)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as client:
        def send(rows, noisy):
            return client.post("/v1/check", json={"logits": rows.tolist(), "noisy_logits": noisy.tolist()})

        benign = [send(test.logits[i:i + 10], test.noisy_logits[i:i + 10]) for i in range(0, 300, 10)]
        assert all(r.status_code == 200 for r in benign)
        assert client.get("/v1/info").json()["campaign"]["clients_in_alarm"] == 0
        stream = attack_like(test.logits[0], 60, scale=0.01)
        noisy = np.repeat(test.noisy_logits[:1], 60, axis=0)
        codes = [send(stream[i:i + 1], noisy[i:i + 1]).status_code for i in range(60)]
        info = client.get("/v1/info").json()["campaign"]
        text = client.get("/metrics").text
    first = codes.index(429)
    assert 25 <= first <= 40 and set(codes[:first]) == {200} and set(codes[first:]) == {429}, codes
    assert info["clients_in_alarm"] == 1 and info["block"] is True
    assert "logitguard_campaign_alarms_total 1.0" in text
