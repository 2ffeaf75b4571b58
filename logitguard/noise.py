"""Noise queries without torch: the guard's noise recipe and the noisy copies of an input it asks for.

A guard whose detector reads noise queries (K > 0) checks the model's logits on an input *and* on K
noise-perturbed copies of it. Whoever holds the input (a client of a remote model, a serving transformer)
makes those copies here, in NumPy, with the recipe the guard was fitted with (``guard.noise_recipe``;
the producer made the table's copies with the same recipe on torch, `producers.data.noise`).

- `NoiseRecipe`: one (kind, scale) per query, and the clip range. Kinds: ``gaussian`` N(0, s²),
  ``uniform`` U(-s, s), ``sign`` ±s with probability ½ each. Written as ``kind:scale,...`` (cycled to K
  queries) or as table / guard metadata ``{"queries": K, "recipe": [{"kind", "scale"}, ...], "clip": [0, 1]}``.
- `noisy_copies`: (B, *shape) images in [0, 1] -> (B, K, *shape) copies ``clip(image + noise_k)``.
- `query_model`: a model callable's logits on images and on their copies, in one batched call.

Draws are seeded and reproducible, and equal the producer's torch draws in distribution (not bit for bit:
the generators differ); tests/test_noise.py compares them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import LogitguardError

NOISE_KINDS = ("gaussian", "uniform", "sign")
DEFAULT_NOISE = "gaussian:0.05,gaussian:0.1,uniform:0.1,sign:0.05"
DEFAULT_CLIP = (0.0, 1.0)

Seed = int | np.random.Generator | None

__all__ = ["DEFAULT_CLIP", "DEFAULT_NOISE", "NOISE_KINDS", "NoiseRecipe", "as_recipe", "noisy_copies", "query_model"]


@dataclass(frozen=True)
class NoiseRecipe:
    """One (kind, scale) per noise query, K in all, and the range copies are clipped to."""

    queries: tuple[tuple[str, float], ...]
    clip: tuple[float, float] = DEFAULT_CLIP
    error: ClassVar[type[Exception]] = LogitguardError  # what bad recipes raise (the producer: ProducerError)

    def __post_init__(self) -> None:
        queries = tuple((str(kind), float(scale)) for kind, scale in self.queries)
        for kind, scale in queries:
            if kind not in NOISE_KINDS:
                raise self.error(f"unknown noise kind {kind!r}; known: {list(NOISE_KINDS)}")
            if not 0 < scale < np.inf:
                raise self.error(f"noise scale must be positive and finite, got {kind}:{scale}")
        if not queries:
            raise self.error("a noise recipe needs at least one query")
        low, high = (float(v) for v in self.clip)
        if not low < high:
            raise self.error(f"the clip range must be [low, high] with low < high, got {list(self.clip)}")
        object.__setattr__(self, "queries", queries)
        object.__setattr__(self, "clip", (low, high))

    @classmethod
    def parse(cls, spec: str, k: int) -> NoiseRecipe:
        """`k` queries cycling through ``kind:scale`` items, e.g. ``"gaussian:0.05,sign:0.02"``."""
        items = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, scale = item.partition(":")
            if kind not in NOISE_KINDS:
                raise cls.error(f"unknown noise kind {kind!r} in {spec!r}; known: {list(NOISE_KINDS)}")
            try:
                value = float(scale)
            except ValueError:
                raise cls.error(f"noise item {item!r} needs a numeric scale, e.g. {kind}:0.05") from None
            if not value > 0:
                raise cls.error(f"noise scale must be positive, got {item!r}")
            items.append((kind, value))
        if not items:
            raise cls.error(f"empty noise recipe {spec!r}")
        if k < 1:
            raise cls.error(f"the number of noise queries must be at least 1, got {k}")
        return cls(tuple(items[i % len(items)] for i in range(k)))

    @classmethod
    def from_metadata(cls, noise: Mapping[str, Any] | None) -> NoiseRecipe | None:
        """The recipe a table's or a guard's ``noise`` metadata records; None when it records none.
        Other keys (the producer's ``seed``) are ignored; a missing ``clip`` is [0, 1]."""
        if not noise:
            return None
        try:
            recipe = cls(tuple((q["kind"], float(q["scale"])) for q in noise["recipe"]),
                         tuple(noise.get("clip", DEFAULT_CLIP)))
            declared = noise.get("queries", len(recipe))
        except (KeyError, TypeError, ValueError, LogitguardError):
            raise cls.error(f"the noise metadata is not a recipe: {dict(noise)!r}") from None
        if declared != len(recipe):
            raise cls.error(f"the noise metadata declares {declared} queries but its recipe lists {len(recipe)}")
        return recipe

    def to_metadata(self) -> dict[str, Any]:
        """``{"queries": K, "recipe": [{"kind", "scale"}, ...], "clip": [low, high]}`` (JSON-ready)."""
        return {"queries": len(self), "recipe": [{"kind": k, "scale": s} for k, s in self.queries],
                "clip": list(self.clip)}

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def labels(self) -> tuple[str, ...]:
        """Each query's ``kind:scale`` (K,), e.g. ``"gaussian:0.05"``: the odds test groups queries by these."""
        return tuple(f"{kind}:{scale:g}" for kind, scale in self.queries)

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Noise (B, K, *image_shape) float32 for a batch of `shape` (B, *image_shape), before clipping.
        One draw per kind, vectorised over the batch and that kind's queries."""
        b, *rest = shape
        out = np.empty((b, len(self), *rest), dtype=np.float32)
        kinds = np.array([k for k, _ in self.queries])
        scales = np.array([s for _, s in self.queries], dtype=np.float32).reshape(1, -1, *[1] * len(rest))
        for kind in NOISE_KINDS:
            (idx,) = np.nonzero(kinds == kind)
            if not len(idx):
                continue
            size, s = (b, len(idx), *rest), scales[:, idx]
            if kind == "gaussian":
                out[:, idx] = rng.standard_normal(size, dtype=np.float32) * s
            elif kind == "uniform":
                out[:, idx] = (rng.random(size, dtype=np.float32) * 2 - 1) * s
            else:
                out[:, idx] = np.where(rng.random(size, dtype=np.float32) < 0.5, s, -s)
        return out


def as_recipe(recipe: NoiseRecipe | Mapping[str, Any]) -> NoiseRecipe:
    """A `NoiseRecipe` as is, or one read from its metadata form (`NoiseRecipe.from_metadata`)."""
    if isinstance(recipe, NoiseRecipe):
        return recipe
    if isinstance(recipe, Mapping) and recipe:
        return NoiseRecipe.from_metadata(recipe)  # type: ignore[return-value]
    raise LogitguardError(f"expected a NoiseRecipe or its metadata dict, got {recipe!r}")


def noisy_copies(images: np.ndarray, recipe: NoiseRecipe | Mapping[str, Any], *, seed: Seed = None) -> np.ndarray:
    """K noisy copies (B, K, *shape) of each of `images` (B, *shape), floats in [0, 1]: query k of image b is
    ``clip(images[b] + noise_k, *recipe.clip)``, noise drawn in float32 as the producer does.

    The copies are float32 for float32 (or float16) images and float64 for float64 ones, as the producer's
    ``x + noise`` gives. `seed`: an int or a `numpy.random.Generator` (drawn from, so successive calls differ).
    """
    recipe = as_recipe(recipe)
    x = np.asarray(images)
    if x.ndim < 2 or not len(x):
        raise LogitguardError(f"images must be a batch (B, *shape) with B >= 1, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise LogitguardError(f"images must be floats in [0, 1], got dtype {x.dtype} (divide uint8 images by 255)")
    noise = recipe.draw(x.shape, np.random.default_rng(seed))
    copies = np.add(x[:, None], noise, dtype=np.result_type(x.dtype, np.float32))
    return np.clip(copies, *recipe.clip, out=copies)


def query_model(model: Callable[[np.ndarray], Any], images: np.ndarray, recipe: NoiseRecipe | Mapping[str, Any] | None,
                *, seed: Seed = None, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The logits of `model` (images (n, *shape) -> logits (n, C)) on `images` (B, *shape) and on their noisy
    copies: (logits (B, C), noisy logits (B, K, C)), or (logits, None) without a recipe.

    The model sees each chunk of images followed by their K copies, B*(K+1) rows in one call unless
    `batch_size` caps the rows per call; copies are drawn chunk by chunk (so they depend on `batch_size`).
    """
    x = np.asarray(images)
    rng = np.random.default_rng(seed)
    recipe = None if recipe is None else as_recipe(recipe)
    k = 0 if recipe is None else len(recipe)
    per_call = len(x) if batch_size is None else max(1, batch_size // (k + 1))
    logits, noisy = [], []
    for start in range(0, len(x), per_call or 1):
        chunk = x[start:start + per_call]
        rows = chunk if recipe is None else np.concatenate(
            [chunk.astype(np.result_type(chunk.dtype, np.float32), copy=False),
             noisy_copies(chunk, recipe, seed=rng).reshape(len(chunk) * k, *chunk.shape[1:])])
        out = np.asarray(model(rows))
        if out.ndim != 2 or len(out) != len(rows):
            raise LogitguardError(f"the model must return logits (n, C) for n = {len(rows)} inputs, got shape "
                                  f"{out.shape}")
        logits.append(out[:len(chunk)])
        if k:
            noisy.append(out[len(chunk):].reshape(len(chunk), k, -1))
    if not logits:
        raise LogitguardError("no images to query the model on")
    return np.concatenate(logits), None if recipe is None else np.concatenate(noisy)
