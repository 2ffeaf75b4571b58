"""A client of ``logitguard serve``, and a model's inputs checked end to end, in-process or through the service.

- `GuardClient(url, token=, timeout=)`: posts logits (N, C) and noise queries (N, K, C) to ``/v1/check``
  and returns a `Decision`, as `Guard.check` does in-process; reads ``/v1/info`` once for the guard's C, K
  and noise recipe. A context manager around one `httpx.Client` (the ``client`` or ``serve`` extra).
- `check_model(model, images, guard)`: makes the guard's K noisy copies of each image
  (`logitguard.noisy_copies`), asks `model` (images -> logits, e.g. a function calling a remote model) for
  the logits of images and copies in one batched call, and checks them with `guard`: a local `Guard` or a
  `GuardClient`.

Errors the service answers become a `ServiceError` (a `LogitguardError`) with its status code and its
one-line detail. Imports neither FastAPI nor torch; httpx only when a `GuardClient` is made.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .defenses.decision import ABSTAIN, Decision
from .errors import LogitguardError
from .noise import NoiseRecipe, Seed, as_recipe, query_model

if TYPE_CHECKING:
    import httpx

DEFAULT_TIMEOUT = 30.0
DEFAULT_BATCH_ROWS = 1024

__all__ = ["DEFAULT_BATCH_ROWS", "DEFAULT_TIMEOUT", "GuardClient", "ServiceError", "check_model"]


class ServiceError(LogitguardError):
    """The guard service refused a request (`status`, its one-line `detail`) or could not be reached
    (`status` None)."""

    def __init__(self, message: str, *, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail if detail is not None else message


class Checker(Protocol):
    """What `check_model` checks with: a `Guard` or a `GuardClient`."""

    num_queries: int
    noise_recipe: NoiseRecipe | None

    def check(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> Decision: ...


class GuardClient:
    """Calls a guard service at `url` (``http://host:port``); `check` answers like `Guard.check`.

    `token` goes in ``Authorization: Bearer``; `batch_rows` rows at most per request (the service refuses
    more than its ``max_rows``); `transport` is httpx's (tests, proxies). Use it in a ``with`` block, or `close`.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 batch_rows: int = DEFAULT_BATCH_ROWS, transport: httpx.BaseTransport | None = None) -> None:
        try:
            import httpx
        except ImportError:
            raise LogitguardError("GuardClient needs httpx: pip install 'logitguard[client]'") from None
        if batch_rows < 1:
            raise LogitguardError(f"batch_rows must be at least 1, got {batch_rows}")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url, self.batch_rows = url.rstrip("/"), int(batch_rows)
        self._httpx = httpx
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._info: dict[str, Any] | None = None

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"GuardClient({self.url!r})"

    # -- what the guard expects -----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: ``{"status": "ok"}`` while the service is up (open without a token)."""
        return self._request("GET", "/v1/health").json()

    def info(self, *, refresh: bool = False) -> dict[str, Any]:
        """``GET /v1/info`` (`Guard.info`, the server's limits, drift), fetched once and kept unless `refresh`."""
        if self._info is None or refresh:
            self._info = self._request("GET", "/v1/info").json()
        return self._info

    @property
    def num_classes(self) -> int:
        return int(self.info()["num_classes"])

    @property
    def num_queries(self) -> int:
        return int(self.info()["num_queries"])

    @property
    def class_names(self) -> list[str]:
        return list(self.info()["classes"])

    @property
    def noise_recipe(self) -> NoiseRecipe | None:
        """The guard's `NoiseRecipe` (``/v1/info``'s ``noise``); None when it reads no noise queries."""
        noise = self.info().get("noise")
        return None if not self.num_queries or not noise else as_recipe(noise)

    # -- checking -------------------------------------------------------------------------------

    def check(self, logits: np.ndarray, noisy_logits: np.ndarray | None = None) -> Decision:
        """Decisions (N,) on logits (N, C) and noise queries (N, K, C), posted to ``/v1/check`` as JSON,
        `batch_rows` rows per request. Raises `ServiceError` with the service's status and detail."""
        logits = np.asarray(logits)
        noisy = None if noisy_logits is None else np.asarray(noisy_logits)
        if logits.ndim != 2 or not len(logits):
            raise LogitguardError(f"logits must be (N, C) with N >= 1, got shape {logits.shape}")
        if noisy is not None and len(noisy) != len(logits):
            raise LogitguardError(f"noisy_logits has {len(noisy)} rows; logits has {len(logits)}")
        parts = []
        for start in range(0, len(logits), self.batch_rows):
            rows = slice(start, start + self.batch_rows)
            body: dict[str, Any] = {"logits": logits[rows].tolist()}
            if noisy is not None:
                body["noisy_logits"] = noisy[rows].tolist()
            # json.dumps lets NaN through as a token: the service refuses it with its own 422 detail.
            answer = self._request("POST", "/v1/check", content=json.dumps(body).encode(),
                                   headers={"content-type": "application/json"}).json()
            parts.append(_decision(answer, len(logits[rows])))
        return Decision(*(np.concatenate(column) for column in zip(*parts)))

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach the guard service at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = str(response.json()["detail"])
            except (ValueError, KeyError, TypeError):
                detail = (response.text.strip().splitlines() or [response.reason_phrase])[0][:300]
            raise ServiceError(f"the guard service answered {response.status_code} to {method} {path}: {detail}",
                               status=response.status_code, detail=detail)
        return response


def _decision(answer: Mapping[str, Any], rows: int) -> Decision:
    """A ``/v1/check`` JSON answer as a `Decision` (score NaN where null, label `ABSTAIN` where rejected)."""
    results = answer.get("results")
    if not isinstance(results, list) or len(results) != rows:
        raise ServiceError(f"the guard service answered {len(results) if isinstance(results, list) else 'no'} "
                           f"results for {rows} rows")
    score = [r["score"] for r in results]
    label = [r["label"] for r in results]
    return Decision(np.array([r["model_label"] for r in results], dtype=np.int64),
                    np.array([r["flagged"] for r in results], dtype=bool),
                    np.array([np.nan if s is None else s for s in score], dtype=np.float64),
                    np.array([ABSTAIN if v is None else v for v in label], dtype=np.int64))


def check_model(model: Callable[[np.ndarray], Any], images: np.ndarray, guard: Checker, *,
                recipe: NoiseRecipe | Mapping[str, Any] | None = None, seed: Seed = None,
                batch_size: int | None = None) -> Decision:
    """Check `model` on `images` (B, *shape) floats in [0, 1] with `guard` (a `Guard` or a `GuardClient`).

    When the guard reads K noise queries, K noisy copies of each image are made with `recipe` (default:
    the guard's own, ``guard.noise_recipe``) and `seed`; `model` (n inputs -> logits (n, C)) answers
    images and copies in one call of B*(K+1) rows (`batch_size` caps the rows per call, `query_model`).
    Returns the guard's `Decision` (B,).
    """
    k = int(guard.num_queries)
    if k and recipe is None:
        recipe = guard.noise_recipe
        if recipe is None:
            raise LogitguardError(f"the guard reads K = {k} noise queries but records no noise recipe; pass recipe=")
    recipe = None if not k or recipe is None else as_recipe(recipe)
    if recipe is not None and len(recipe) != k:
        raise LogitguardError(f"the recipe makes {len(recipe)} noise queries; the guard expects K = {k}")
    logits, noisy = query_model(model, images, recipe, seed=seed, batch_size=batch_size)
    return guard.check(logits, noisy)
