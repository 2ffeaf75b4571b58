"""Noise queries without torch (`logitguard.noise`): the recipe's parsing and metadata round trip exactly, and
`noisy_copies` draws what the producer's torch sampler draws, in distribution (the generators differ, so
not bit for bit): per kind mean, std and a two-sample KS test against `producers.data.noise.noise_queries`
on many draws, sign values exactly ±s, the same clipping, dtype and query order. A guard fitted on the
producer's (torch) noise queries accepts the producer's model's logits on NumPy-made copies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import logitguard
from logitguard import Guard, LogitguardError, NoiseRecipe, noisy_copies, query_model, read_table
from logitguard.noise import DEFAULT_NOISE
from producers.data.noise import NoiseRecipe as ProducerRecipe
from producers.data.noise import noise_queries
from producers.errors import ProducerError

DATA = Path(__file__).resolve().parents[1] / "data"
PIXELS = (1, 16, 16)
BATCH = 800  # x K=2 x 256 pixels: ~410k draws per kind and side


def torch_copies(images: np.ndarray, recipe: NoiseRecipe, seed: int) -> np.ndarray:
    """The producer's own noisy copies (B, K, *shape): `noise_queries` through a model that returns its input."""
    producer = ProducerRecipe(recipe.queries, recipe.clip)
    out = noise_queries(torch.nn.Flatten(), torch.from_numpy(images), producer,
                        generator=torch.Generator().manual_seed(seed))
    return out.numpy().reshape(len(images), len(recipe), *images.shape[1:])


def both(spec: str, k: int, value: float, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images all equal to `value`; NumPy's and torch's copies minus the images (B, K, *PIXELS)."""
    images = np.full((BATCH, *PIXELS), value, dtype=dtype)
    recipe = NoiseRecipe.parse(spec, k)
    ours, theirs = noisy_copies(images, recipe, seed=0), torch_copies(images, recipe, seed=0)
    return images, ours - images[:, None], theirs - images[:, None]


# -- the recipe ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,k", [(DEFAULT_NOISE, 8), ("gaussian:0.05,sign:0.02", 5), ("uniform:0.3", 1),
                                    ("sign:0.0039215686", 3)])
def test_metadata_round_trip_is_exact(spec, k):
    recipe = NoiseRecipe.parse(spec, k)
    meta = recipe.to_metadata()
    assert json.loads(json.dumps(meta)) == meta  # JSON-ready, as tables and guard headers store it
    again = NoiseRecipe.from_metadata(json.loads(json.dumps(meta)))
    assert again == recipe and again.to_metadata() == meta and again.labels == recipe.labels
    # The producer's recipe is the core's: same parse, same metadata, read back as either class.
    producer = ProducerRecipe.parse(spec, k)
    assert producer.to_metadata() == meta and producer.queries == recipe.queries
    assert ProducerRecipe.from_metadata(meta).to_metadata() == meta
    assert isinstance(producer, NoiseRecipe)


def test_the_embedded_tables_and_guards_recipe_reads_back_exactly():
    table = read_table(DATA / "fashion-mnist", split="test")
    noise = table.metadata["noise"]  # written by the producer: its to_metadata() plus the export seed
    recipe = NoiseRecipe.from_metadata(noise)
    assert recipe.to_metadata() == {k: v for k, v in noise.items() if k != "seed"}
    assert recipe == NoiseRecipe.parse(DEFAULT_NOISE, 8) and len(recipe) == table.noisy_logits.shape[1]
    assert NoiseRecipe.from_metadata(None) is None and NoiseRecipe.from_metadata({}) is None


def test_a_guard_exposes_its_recipe(digits_split_table, digits_cnn_guard, tmp_path):
    from logitguard.evaluation.guard import fit_guard

    guard = digits_cnn_guard
    assert guard.noise_recipe == NoiseRecipe.parse(DEFAULT_NOISE, 8) and len(guard.noise_recipe) == guard.num_queries
    loaded = Guard.load(guard.save(tmp_path / "guard.npz"))
    assert loaded.noise_recipe == guard.noise_recipe and loaded.info()["noise"] == guard.info()["noise"]
    msp = fit_guard(digits_split_table, detector="msp", budgets=(0.2,))  # K = 0: no recipe
    assert msp.num_queries == 0 and msp.noise_recipe is None
    # K > 0 on a table that records no recipe: unknown, not invented.
    assert fit_guard(digits_split_table, detector="odds", budgets=(0.2,)).noise_recipe is None


def test_parse_cycles_and_refuses_bad_recipes():
    assert NoiseRecipe.parse("gaussian:0.05, sign:0.02", 5).queries == (
        ("gaussian", 0.05), ("sign", 0.02), ("gaussian", 0.05), ("sign", 0.02), ("gaussian", 0.05))
    for spec, k, message in [("pink:0.1", 4, "unknown noise kind 'pink' in 'pink:0.1'"),
                             ("gaussian:x", 2, "noise item 'gaussian:x' needs a numeric scale"),
                             ("sign:-0.1", 2, "noise scale must be positive, got 'sign:-0.1'"),
                             (" , ", 2, "empty noise recipe"),
                             ("sign:0.1", 0, "the number of noise queries must be at least 1, got 0")]:
        with pytest.raises(LogitguardError, match=re.escape(message)):
            NoiseRecipe.parse(spec, k)
        with pytest.raises(ProducerError, match=re.escape(message)):  # the producer raises its own type
            ProducerRecipe.parse(spec, k)
    meta = NoiseRecipe.parse("sign:0.1", 2).to_metadata()
    for bad, message in [({**meta, "queries": 3}, "declares 3 queries but its recipe lists 2"),
                         ({"queries": 3}, "the noise metadata is not a recipe"),
                         ({**meta, "recipe": [{"kind": "blur", "scale": 1}]}, "not a recipe"),
                         ({**meta, "clip": [1, 0]}, "not a recipe")]:
        with pytest.raises(LogitguardError, match=re.escape(message)):
            NoiseRecipe.from_metadata(bad)
    with pytest.raises(LogitguardError, match="unknown noise kind 'pink'"):
        NoiseRecipe((("pink", 0.1),))


# -- the copies: equal in distribution to the producer's ------------------------------------


@pytest.mark.parametrize("kind,scale,theory", [
    ("gaussian", 0.05, stats.norm(0, 0.05)),
    ("gaussian", 0.1, stats.norm(0, 0.1)),
    ("uniform", 0.1, stats.uniform(-0.1, 0.2)),
])
def test_continuous_noise_matches_the_producers_in_distribution(kind, scale, theory):
    _, ours, theirs = both(f"{kind}:{scale}", 2, 0.5)  # 0.5 +- 5 sigma stays inside [0, 1]: no clipping
    ours, theirs = ours.ravel().astype(np.float64), theirs.ravel().astype(np.float64)
    n = len(ours)
    for sample in (ours, theirs):
        assert abs(sample.mean()) < 5 * theory.std() / np.sqrt(n)
        assert sample.std() == pytest.approx(theory.std(), rel=0.01)
        assert stats.kstest(sample, theory.cdf).pvalue > 1e-3
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3  # NumPy's draws against torch's


def test_sign_noise_is_exactly_plus_or_minus_scale_with_equal_odds():
    scale = 0.05
    _, ours, theirs = both(f"sign:{scale}", 2, 0.5)
    s = np.float32(scale)
    # The raw draws, before adding: exactly -s or +s in float32 (x + s - x need not give s back bit for bit).
    raw = NoiseRecipe.parse(f"sign:{scale}", 2).draw((BATCH, *PIXELS), np.random.default_rng(0))
    torch_raw = ProducerRecipe.parse(f"sign:{scale}", 2).sample(torch.Size((BATCH, *PIXELS)),
                                                                 torch.Generator().manual_seed(0), torch.device("cpu"))
    for sample in (raw, torch_raw.numpy()):
        assert sample.dtype == np.float32 and set(np.unique(sample).tolist()) == {float(-s), float(s)}
        plus = int((sample > 0).sum())
        assert stats.binomtest(plus, sample.size, 0.5).pvalue > 1e-3
    # After adding to 0.5 both sides hold the same two values.
    assert set(np.unique(ours).tolist()) == set(np.unique(theirs).tolist())
    assert stats.binomtest(int((ours > 0).sum()), ours.size, 0.5).pvalue > 1e-3


@pytest.mark.parametrize("spec,value,clipped", [
    ("gaussian:0.1", 0.0, 0.5), ("gaussian:0.1", 1.0, 0.5), ("uniform:0.1", 0.0, 0.5), ("sign:0.05", 1.0, 0.5),
    ("gaussian:0.1", 0.02, stats.norm.cdf(-0.2)), ("uniform:0.1", 0.95, 0.25),
])
def test_clipping_matches_the_producers(spec, value, clipped):
    images, ours, theirs = both(spec, 2, value)
    lo, hi = -value, 1 - value  # the clip range, as noise: copies stay in [0, 1]
    for sample in (ours, theirs):
        assert sample.min() >= lo - 1e-7 and sample.max() <= hi + 1e-7
        at_edge = np.isclose(sample, lo if value < 0.5 else hi, atol=1e-7).mean()
        assert at_edge == pytest.approx(clipped, abs=0.005)
    assert stats.ks_2samp(ours.ravel(), theirs.ravel()).pvalue > 1e-3


def test_queries_follow_the_recipes_order_dtype_and_shape():
    recipe = NoiseRecipe.parse("gaussian:0.01,uniform:0.2,sign:0.05", 3)
    images = np.full((2000, 3, 4, 4), 0.5, dtype=np.float32)
    copies = noisy_copies(images, recipe, seed=1)
    assert copies.shape == (2000, 3, 3, 4, 4) and copies.dtype == np.float32
    d = (copies - images[:, None]).transpose(1, 0, 2, 3, 4).reshape(3, -1)
    assert d[0].std() == pytest.approx(0.01, rel=0.02)
    assert np.abs(d[1]).max() <= 0.2 + 1e-6 and d[1].std() == pytest.approx(0.2 / np.sqrt(3), rel=0.02)
    np.testing.assert_allclose(np.abs(d[2]), 0.05, atol=1e-6)
    # The producer's order is the same: query k of the torch copies has the same kind.
    theirs = torch_copies(images, recipe, seed=1) - images[:, None]
    for q in range(3):
        assert stats.ks_2samp(d[q], theirs[:, q].ravel()).pvalue > 1e-3
    # dtype follows the producer's x + noise: float64 images give float64 copies; flat (B, D) rows work.
    assert noisy_copies(images.astype(np.float64), recipe, seed=1).dtype == np.float64
    assert noisy_copies(np.zeros((4, 64)), recipe.to_metadata(), seed=1).shape == (4, 3, 64)


def test_copies_are_seeded_and_reproducible():
    images = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    recipe = NoiseRecipe.parse(DEFAULT_NOISE, 8)
    np.testing.assert_array_equal(noisy_copies(images, recipe, seed=3), noisy_copies(images, recipe, seed=3))
    assert not np.array_equal(noisy_copies(images, recipe, seed=3), noisy_copies(images, recipe, seed=4))
    rng = np.random.default_rng(3)  # a Generator is drawn from: the first call equals seed=3
    np.testing.assert_array_equal(noisy_copies(images, recipe, seed=rng), noisy_copies(images, recipe, seed=3))
    assert not np.array_equal(noisy_copies(images, recipe, seed=rng), noisy_copies(images, recipe, seed=3))
    for bad, message in [(images.astype(np.uint8), "images must be floats in"), (images[0, 0, 0], "a batch"),
                         (images[:0], "a batch")]:
        with pytest.raises(LogitguardError, match=message):
            noisy_copies(bad, recipe)
    with pytest.raises(LogitguardError, match="expected a NoiseRecipe or its metadata"):
        noisy_copies(images, "gaussian:0.1")


# -- through the producer's model, into a guard ---------------------------------------------


def test_the_guard_accepts_the_models_logits_on_numpy_copies(digits_cnn, digits_cnn_guard, digits_sets):
    guard = digits_cnn_guard
    _, test = digits_sets
    images = test.all_images()[:300].numpy()  # (300, 1, 8, 8) floats in [0, 1]

    def model(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return digits_cnn(torch.from_numpy(x)).numpy()

    logits, noisy = query_model(model, images, guard.noise_recipe, seed=0)
    assert logits.shape == (300, guard.num_classes) and noisy.shape == (300, guard.num_queries, guard.num_classes)
    decision = guard.check(logits, noisy)  # right K and C: accepted
    np.testing.assert_array_equal(decision.model_label, logits.argmax(axis=1))
    # The same images' torch-made queries: the guard flags clean images at a like rate either way.
    producer = ProducerRecipe.from_metadata(guard.noise)
    with torch.no_grad():
        theirs = noise_queries(digits_cnn, torch.from_numpy(images), producer,
                               generator=torch.Generator().manual_seed(0)).numpy()
    flagged_torch = guard.check(logits, theirs).flagged.mean()
    assert abs(decision.flagged.mean() - flagged_torch) < 0.05
    # Chunked calls (batch_size) give the same logits for the images themselves, and K copies per image.
    chunked, chunked_noisy = query_model(model, images, guard.noise_recipe, seed=0, batch_size=90)
    np.testing.assert_allclose(chunked, logits, rtol=1e-5, atol=1e-5)
    assert chunked_noisy.shape == noisy.shape
    assert logitguard.noisy_copies is noisy_copies and logitguard.NoiseRecipe is NoiseRecipe
