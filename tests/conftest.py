"""Shared fixtures: small real logit tables.

`digits_table` holds the logits of a logistic-regression classifier on scikit-learn's digits, clean and
under a real FGSM attack, with three Gaussian noise queries per row. For a linear model the input gradient of the cross-entropy is exact
(W^T (softmax - onehot)), so the attack needs no autograd and the fixture builds in well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from logitguard import LogitTable

DIGITS_EPS = 0.15  # L-inf budget in [0, 1] pixel units


@pytest.fixture(scope="session")
def digits_model():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    model = LogisticRegression(max_iter=2000).fit(x[:1000], y[:1000])
    return model, x[1000:], y[1000:]


def linear_fgsm(model, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """FGSM on a multinomial logistic regression: x + eps * sign(d CE / d x), clipped to [0, 1]."""
    z = model.decision_function(x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return np.clip(x + eps * np.sign(p @ model.coef_), 0.0, 1.0)


@pytest.fixture(scope="session")
def digits_arrays(digits_model):
    """Clean and FGSM logits of the digits test split, with per-row L-inf/L2 perturbation sizes."""
    model, x, y = digits_model
    x_adv = linear_fgsm(model, x, y, DIGITS_EPS)
    delta = x_adv - x
    rng = np.random.default_rng(0)

    def noise_queries(images: np.ndarray, k: int = 3, sigma: float = 0.05) -> np.ndarray:
        noisy = np.clip(images[:, None, :] + rng.normal(0, sigma, (len(images), k, images.shape[1])), 0, 1)
        return model.decision_function(noisy.reshape(-1, images.shape[1])).reshape(len(images), k, -1)

    return {
        "clean": model.decision_function(x),
        "fgsm": model.decision_function(x_adv),
        "clean_noisy": noise_queries(x),
        "fgsm_noisy": noise_queries(x_adv),
        "labels": y,
        "linf": np.abs(delta).max(axis=1),
        "l2": np.linalg.norm(delta, axis=1),
    }


@pytest.fixture(scope="session")
def digits_table(digits_arrays) -> LogitTable:
    a = digits_arrays
    n = len(a["labels"])
    return LogitTable.from_arrays(
        logits=np.concatenate([a["clean"], a["fgsm"]]),
        sample_id=np.tile(np.arange(n), 2),
        split="test",
        attack=["clean"] * n + ["fgsm"] * n,
        label=np.tile(a["labels"], 2),
        noisy_logits=np.concatenate([a["clean_noisy"], a["fgsm_noisy"]]),
        linf=np.concatenate([np.zeros(n), a["linf"]]),
        l2=np.concatenate([np.zeros(n), a["l2"]]),
        metadata={
            "class_names": [f"digit-{i}" for i in range(10)],
            "dataset": {"name": "digits"},
            "model": {"name": "logistic-regression"},
            "attacks": {"fgsm": {"eps": DIGITS_EPS}},
        },
    )


@pytest.fixture(scope="session")
def digits_sets():
    """The digits train and test splits as producer ImageSets (8x8 grey images in [0, 1])."""
    from producers.datasets import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def digits_cnn(digits_sets):
    """A SmallCNN trained on digits for a few seconds (about 90% test accuracy), in eval mode."""
    import torch

    from producers.models import small_cnn_for, train_classifier

    torch.manual_seed(0)
    train, _ = digits_sets
    return train_classifier(small_cnn_for(train), train, epochs=12, seed=0, progress=False)
