"""The client (`logitguard.client`): `GuardClient` against a real server answers as `Guard.check` does
in-process; `check_model` makes the guard's noise queries with NumPy and checks a model callable's logits,
locally or through the server, with the same decisions; the service's refusals become `ServiceError`s
with status and detail; the client imports neither FastAPI nor torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from logitguard import (ABSTAIN, Decision, GuardClient, LogitguardError, NoiseRecipe, ServiceError, check_model,
                        query_model)
from logitguard.evaluation.guard import fit_guard
from logitguard.serve import create_app, serve_in_thread

REPO = Path(__file__).resolve().parents[1]


def assert_same(a: Decision, b: Decision) -> None:
    """Equal decisions; scores to float64 rounding (the service's may differ from in-process in the last bit)."""
    for name in ("model_label", "flagged", "label"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-12, atol=1e-12, err_msg="score")


@pytest.fixture(scope="module")
def cnn(digits_cnn):
    """The digits CNN as a NumPy callable (images (n, 1, 8, 8) -> logits (n, 10)), as a remote model's would be."""
    def model(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return digits_cnn(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()
    return model


@pytest.fixture(scope="module")
def images(digits_sets):
    return digits_sets[1].all_images()[:120].numpy()


@pytest.fixture(scope="module")
def url(digits_cnn_guard):
    with serve_in_thread(create_app(digits_cnn_guard)) as base:
        yield base


def test_the_client_answers_as_the_guard_does_in_process(url, digits_cnn_guard, cnn, images):
    guard = digits_cnn_guard
    logits, noisy = query_model(cnn, images, guard.noise_recipe, seed=0)
    with GuardClient(url) as client:
        assert client.health()["status"] == "ok"
        assert (client.num_classes, client.num_queries) == (guard.num_classes, guard.num_queries)
        assert client.class_names == guard.class_names and client.noise_recipe == guard.noise_recipe
        remote = client.check(logits, noisy)
        assert_same(remote, guard.check(logits, noisy))
        assert remote.score.dtype == np.float64 and remote.label.dtype == np.int64
    with GuardClient(url, batch_rows=7) as client:  # 18 requests of at most 7 rows: the same decisions
        assert_same(client.check(logits, noisy), remote)


def test_check_model_in_process_and_through_the_server_agree(url, digits_cnn_guard, cnn, images):
    guard = digits_cnn_guard
    calls = []

    def counted(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return cnn(x)

    local = check_model(counted, images, guard, seed=5)
    assert calls == [len(images) * (guard.num_queries + 1)]  # one batched call of B*(K+1) rows
    with GuardClient(url) as client:
        remote = check_model(cnn, images, client, seed=5)  # the recipe comes from /v1/info
    assert_same(remote, local)
    logits, noisy = query_model(cnn, images, guard.noise_recipe, seed=5)
    assert_same(local, guard.check(logits, noisy))
    calls.clear()
    check_model(counted, images, guard, seed=5, batch_size=90)  # 10 images and their 80 copies per call
    assert max(calls) <= 90 and sum(calls) == len(images) * 9


def test_check_model_without_noise_and_without_a_recorded_recipe(digits_split_table, digits_model):
    model, x, _ = digits_model  # logistic regression on 64 pixels in [0, 1]
    msp = fit_guard(digits_split_table, detector="msp", budgets=(0.2,))
    assert_same(check_model(model.decision_function, x[:50], msp), msp.check(model.decision_function(x[:50])))
    odds = fit_guard(digits_split_table, detector="odds", budgets=(0.2,))  # K = 3, the table records no recipe
    with pytest.raises(LogitguardError, match="records no noise recipe; pass recipe="):
        check_model(model.decision_function, x[:50], odds)
    with pytest.raises(LogitguardError, match="the recipe makes 2 noise queries; the guard expects K = 3"):
        check_model(model.decision_function, x[:50], odds, recipe=NoiseRecipe.parse("gaussian:0.05", 2))
    decision = check_model(model.decision_function, x[:50], odds, seed=0,
                           recipe=NoiseRecipe.parse("gaussian:0.05", 3))
    assert decision.label.shape == (50,)
    with pytest.raises(LogitguardError, match=r"the model must return logits \(n, C\) for n = 200 inputs"):
        check_model(lambda v: model.decision_function(v)[:10], x[:50], odds, recipe={"recipe": [
            {"kind": "sign", "scale": 0.05}] * 3})


def test_the_services_refusals_become_service_errors(url, digits_cnn_guard):
    logits = np.zeros((2, 10))
    with GuardClient(url) as client:
        with pytest.raises(ServiceError, match="answered 422 to POST /v1/check: noisy_logits is required") as info:
            client.check(logits)
        assert info.value.status == 422 and info.value.detail.startswith("noisy_logits is required")
        assert isinstance(info.value, LogitguardError)
        with pytest.raises(ServiceError, match="422") as info:
            client.check(logits, np.zeros((2, 3, 10)))  # wrong K
        assert "8" in info.value.detail
        with pytest.raises(ServiceError, match="422"):
            client.check(np.full((2, 10), np.nan), np.zeros((2, 8, 10)))  # NaN: the service's refusal, not json's
        with pytest.raises(LogitguardError, match="logits must be"):
            client.check(np.zeros(10))
    with GuardClient("http://127.0.0.1:9", timeout=2) as client, \
            pytest.raises(ServiceError, match="cannot reach the guard service at http://127.0.0.1:9") as info:
        client.health()
    assert info.value.status is None


def test_a_token_protected_service_answers_with_the_token_and_refuses_without(digits_cnn_guard, cnn, images):
    token = "s3cret-token-for-the-client-0123456789"
    with serve_in_thread(create_app(digits_cnn_guard, token=token)) as base:
        with GuardClient(base, token=token) as client:
            assert_same(check_model(cnn, images[:10], client, seed=1),
                        check_model(cnn, images[:10], digits_cnn_guard, seed=1))
        with GuardClient(base) as client:
            assert client.health()["status"] == "ok"  # the probe is open
            with pytest.raises(ServiceError, match="answered 401 to GET /v1/info") as info:
                client.noise_recipe
            assert info.value.status == 401
        with GuardClient(base, token="wrong") as client, pytest.raises(ServiceError, match="401"):
            client.check(np.zeros((1, 10)), np.zeros((1, 8, 10)))


def test_the_token_goes_in_the_authorization_header_and_odd_errors_keep_one_line():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.url.path == "/v1/check":
            return httpx.Response(503, text="upstream down\n<html>...</html>")
        return httpx.Response(200, json={"results": [{"model_label": 1, "flagged": True, "score": None,
                                                      "label": None}]})

    with GuardClient("http://guard", token="s3cret", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServiceError, match="answered 503 to POST /v1/check: upstream down$") as info:
            client.check(np.zeros((1, 3)))
        assert info.value.status == 503
    assert seen == ["Bearer s3cret"]
    from logitguard.client import _decision

    decision = _decision({"results": [{"model_label": 1, "flagged": True, "score": None, "label": None}]}, 1)
    assert np.isnan(decision.score[0]) and decision.label[0] == ABSTAIN and decision.flagged[0]
    with pytest.raises(ServiceError, match="answered 1 results for 2 rows"):
        _decision({"results": [{}]}, 2)


def test_the_client_imports_without_fastapi_or_torch_and_checks_locally_without_httpx(digits_split_table, tmp_path):
    path = fit_guard(digits_split_table, detector="msp", budgets=(0.2,)).save(tmp_path / "guard.npz")
    code = textwrap.dedent("""
        import sys
        class _Block:
            def __init__(self, names): self.names = names
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.names:
                    raise ImportError(f"No module named {name!r} (blocked by the test)")
        sys.meta_path.insert(0, _Block(sys.argv[2].split(",")))
        import numpy as np
        from logitguard import Guard, GuardClient, check_model, noisy_copies
        guard = Guard.load(sys.argv[1])
        decision = check_model(lambda x: np.asarray(x).reshape(len(x), -1)[:, :10], np.zeros((3, 64)), guard)
        print(decision.model_label.tolist(), sorted({m.split(".")[0] for m in sys.modules} & {"fastapi", "torch", "httpx"}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(path), "fastapi,torch,httpx,uvicorn,starlette"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[0, 0, 0] []"
    run = subprocess.run([sys.executable, "-c", "from logitguard import GuardClient; GuardClient('http://x')"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr  # httpx present: constructing one needs no server
