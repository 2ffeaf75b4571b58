"""examples/transformer.py end to end: digits images -> noisy copies (NumPy) -> a minimal Open Inference
Protocol (V2) model server serving the producer's digits CNN -> the guard (in-process, and through
``logitguard serve``). Its decisions equal the guard's on the same logits, and `check_model`'s."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from logitguard import GuardClient, LogitguardError, check_model, noisy_copies
from logitguard.serve import create_app, serve_in_thread

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transformer.py"
INFER = re.compile(r"^/v2/models/([^/]+)/infer$")


def load_example():
    spec = importlib.util.spec_from_file_location("transformer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def v2_model_server(models: dict):
    """A minimal V2 model server on a free loopback port: ``POST /v2/models/{name}/infer`` runs ``models[name]``
    (a torch module) on the request's one FP32 input and answers ``{"outputs": [{"name": "logits", ...}]}``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            match = INFER.match(self.path)
            if not match or match.group(1) not in models:
                return self._send(404, {"error": f"model not found: {self.path}"})
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            tensor = body["inputs"][0]
            x = torch.from_numpy(np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"]))
            with torch.no_grad():
                logits = models[match.group(1)](x).numpy()
            self._send(200, {"model_name": match.group(1), "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": list(logits.shape), "data": logits.ravel().tolist()}]})

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def model_url(digits_cnn):
    with v2_model_server({"digits-cnn": digits_cnn}) as url:
        yield url


@pytest.fixture(scope="module")
def images(digits_sets):
    return digits_sets[1].all_images()[:64].numpy()  # (64, 1, 8, 8) in [0, 1]


def cnn_callable(digits_cnn):
    def model(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return digits_cnn(torch.from_numpy(x)).numpy()
    return model


def test_the_transformer_decides_as_the_guard_on_the_same_logits(example, model_url, digits_cnn, digits_cnn_guard,
                                                                  images):
    guard = digits_cnn_guard
    b, k = len(images), guard.num_queries
    with example.NoiseQueryTransformer(guard, model_url, "digits-cnn", seed=7) as transformer:
        request = transformer.preprocess(images)
        response = transformer.predict(request)
        answer = transformer.postprocess(response)
    # Pre-process: the images, then their K copies drawn with the guard's recipe.
    sent = np.asarray(request["inputs"][0]["data"], dtype=np.float32).reshape(request["inputs"][0]["shape"])
    assert sent.shape == (b * (k + 1), 1, 8, 8)
    np.testing.assert_array_equal(sent[:b], images)
    np.testing.assert_array_equal(sent[b:].reshape(b, k, 1, 8, 8), noisy_copies(images, guard.noise_recipe, seed=7))
    # The model server answered every row; the guard on those logits decides as the transformer did.
    logits = cnn_callable(digits_cnn)(sent)
    np.testing.assert_array_equal(example.v2_array(response["outputs"][0]), logits)
    decision = example.decision_of(answer)
    expected = guard.check(logits[:b], logits[b:].reshape(b, k, -1))
    for name in decision._fields:
        np.testing.assert_array_equal(getattr(decision, name), getattr(expected, name), err_msg=name)
    # ... and as the library's check_model does with the same seed, in one process.
    direct = check_model(cnn_callable(digits_cnn), images, guard, seed=7)
    for name in decision._fields:
        np.testing.assert_array_equal(getattr(decision, name), getattr(direct, name), err_msg=name)
    assert answer["outputs"][0]["shape"] == [b] and 0 < (decision.label != -1).mean()


def test_the_transformer_with_the_guard_behind_logitguard_serve(example, model_url, digits_cnn_guard, images):
    with example.NoiseQueryTransformer(digits_cnn_guard, model_url, "digits-cnn", seed=3) as local:
        expected = example.decision_of(local(images))
    with serve_in_thread(create_app(digits_cnn_guard)) as guard_url, GuardClient(guard_url) as client, \
            example.NoiseQueryTransformer(client, model_url, "digits-cnn", seed=3) as remote:
        got = example.decision_of(remote(images))
    for name in ("model_label", "flagged", "label"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    np.testing.assert_allclose(got.score, expected.score, rtol=1e-12, atol=1e-12)


def test_the_example_runs_as_a_script_and_names_model_server_errors(example, model_url, digits_cnn_guard, images,
                                                                     tmp_path, capsys):
    guard_path = digits_cnn_guard.save(tmp_path / "guard.npz")
    np.save(tmp_path / "images.npy", images[:5])
    example.main(["--guard", str(guard_path), "--model-url", model_url, "--model-name", "digits-cnn",
                  "--images", str(tmp_path / "images.npy"), "--seed", "0"])
    answer = json.loads(capsys.readouterr().out)
    labels = answer["outputs"][0]["data"]
    assert len(labels) == 5 and answer["rejected"] == labels.count(-1)
    with example.NoiseQueryTransformer(digits_cnn_guard, model_url, "nope") as transformer, \
            pytest.raises(LogitguardError, match="the model server answered 404"):
        transformer(images[:2])
