"""A serving transformer in front of a model: pre-process makes the guard's noise queries, the model server
answers all of them, post-process calls the guard (docs/remote-model.md, "A transformer in front of a model
server").

    images (B, *shape) ─ preprocess ─► V2 infer request: the B images, then their B*K noisy copies
                                          │  POST {model_url}/v2/models/{model_name}/infer
    answer ◄─ postprocess ◄─ logits (B*(K+1), C): guard.check(logits[:B], logits[B:] as (B, K, C))

The model server speaks the Open Inference Protocol (V2: KServe, Triton, MLServer, Seldon); the guard is a
`logitguard.Guard` in this process or a `logitguard.GuardClient` of ``logitguard serve``. The three steps
have KServe's names (``kserve.Model.preprocess / predict / postprocess``), so a KServe transformer
subclasses ``kserve.Model`` and calls them; this file needs only logitguard and httpx.

    python examples/transformer.py --guard guard.npz --model-url http://127.0.0.1:8080 --model-name cnn \\
        --images images.npy          # (B, *shape) floats in [0, 1]; prints one JSON answer
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
import numpy as np

from logitguard import ABSTAIN, Decision, Guard, GuardClient, LogitguardError, noisy_copies

V2_DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}


class NoiseQueryTransformer:
    """Pre-process, predict and post-process for one model behind one guard (a `Guard` or `GuardClient`).

    `seed` seeds the noise (an int or a `numpy.random.Generator`; None: fresh draws every request).
    """

    def __init__(self, guard: Guard | GuardClient, model_url: str, model_name: str, *, input_name: str = "input-0",
                 seed: int | np.random.Generator | None = None, timeout: float = 30.0) -> None:
        self.guard, self.model_name, self.input_name = guard, model_name, input_name
        self.k = int(guard.num_queries)
        self.recipe = guard.noise_recipe if self.k else None
        if self.k and self.recipe is None:
            raise LogitguardError("the guard reads noise queries but records no recipe")
        self.rng = np.random.default_rng(seed)
        self.http = httpx.Client(base_url=model_url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> NoiseQueryTransformer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def preprocess(self, images: np.ndarray) -> dict[str, Any]:
        """A V2 infer request of images (B, *shape) in [0, 1] followed by their K noisy copies: B*(K+1) inputs."""
        x = np.asarray(images, dtype=np.float32)
        if self.k:
            x = np.concatenate([x, noisy_copies(x, self.recipe, seed=self.rng).reshape(-1, *x.shape[1:])])
        return {"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}

    def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        """The model server's V2 infer response to `request`."""
        response = self.http.post(f"/v2/models/{self.model_name}/infer", json=request)
        if response.status_code != 200:
            raise LogitguardError(f"the model server answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def postprocess(self, response: dict[str, Any]) -> dict[str, Any]:
        """The guard's decision on a V2 response of B*(K+1) logit rows, as a V2 response of B rows:
        ``label`` (-1 where rejected), ``flagged``, ``score`` and the model's own ``model_label``."""
        decision = self.check(response)
        n = len(decision.label)

        def output(name: str, datatype: str, values: np.ndarray) -> dict[str, Any]:
            return {"name": name, "datatype": datatype, "shape": [n], "data": values.tolist()}

        return {"model_name": self.model_name, "outputs": [
            output("label", "INT64", decision.label), output("flagged", "BOOL", decision.flagged),
            output("score", "FP64", decision.score), output("model_label", "INT64", decision.model_label)]}

    def check(self, response: dict[str, Any]) -> Decision:
        """The guard's `Decision` (B,) on a V2 response of B*(K+1) logit rows (images first, then copies)."""
        logits = v2_array(response["outputs"][0])
        if logits.ndim != 2 or len(logits) % (self.k + 1):
            raise LogitguardError(f"the model answered shape {logits.shape}; expected (B*(K+1), C) with K = {self.k}")
        b = len(logits) // (self.k + 1)
        return self.guard.check(logits[:b], logits[b:].reshape(b, self.k, -1) if self.k else None)

    def __call__(self, images: np.ndarray) -> dict[str, Any]:
        return self.postprocess(self.predict(self.preprocess(images)))


def v2_array(tensor: dict[str, Any]) -> np.ndarray:
    """One V2 tensor (``shape``, ``datatype``, flat or nested ``data``) as an array."""
    dtype = V2_DATATYPES.get(tensor.get("datatype"))
    if dtype is None:
        raise LogitguardError(f"expected logits of datatype {sorted(V2_DATATYPES)}, got {tensor.get('datatype')!r}")
    return np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])


def decision_of(answer: dict[str, Any]) -> Decision:
    """`postprocess`'s answer back as a `Decision` (for the caller of the transformer)."""
    out = {o["name"]: np.asarray(o["data"]) for o in answer["outputs"]}
    return Decision(out["model_label"].astype(np.int64), out["flagged"].astype(bool),
                    out["score"].astype(np.float64), out["label"].astype(np.int64))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard", required=True, help="a guard file, or the URL of `logitguard serve`")
    parser.add_argument("--model-url", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--images", required=True, help=".npy of (B, *shape) floats in [0, 1]")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    remote = args.guard.startswith(("http://", "https://"))
    guard = GuardClient(args.guard) if remote else Guard.load(args.guard)
    try:
        with NoiseQueryTransformer(guard, args.model_url, args.model_name, seed=args.seed) as transformer:
            answer = transformer(np.load(args.images))
    finally:
        if remote:
            guard.close()
    rejected = int((np.asarray(answer["outputs"][0]["data"]) == ABSTAIN).sum())
    print(json.dumps({**answer, "rejected": rejected}))


if __name__ == "__main__":
    main()
