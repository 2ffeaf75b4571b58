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
    from producers.data.datasets import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def digits_cnn(digits_sets):
    """A SmallCNN trained on digits for a few seconds (about 90% test accuracy), in eval mode."""
    import torch

    from producers.models.classifiers import small_cnn_for, train_classifier

    torch.manual_seed(0)
    train, _ = digits_sets
    return train_classifier(small_cnn_for(train), train, epochs=12, seed=0, progress=False)


def linear_bim(model, x: np.ndarray, y: np.ndarray, eps: float, steps: int = 10) -> np.ndarray:
    """BIM (iterated FGSM, step eps/4, projected to the eps ball and [0, 1]) on the logistic regression."""
    x_adv = x.copy()
    for _ in range(steps):
        x_adv = np.clip(linear_fgsm(model, x_adv, y, eps / 4), x - eps, x + eps)
    return x_adv


@pytest.fixture(scope="session")
def digits_split_table(digits_model) -> LogitTable:
    """Clean, FGSM and BIM logits of the logistic regression on held-out digits, with train and test splits.

    The 797 held-out images are split 400 (train, for fitting defenses) / 397 (test); every row has
    three Gaussian noise queries (sigma 0.05) and its perturbation sizes.
    """
    model, x, y = digits_model
    rng = np.random.default_rng(1)
    parts = {"clean": x, "fgsm": linear_fgsm(model, x, y, DIGITS_EPS), "bim": linear_bim(model, x, y, DIGITS_EPS)}
    n, k = len(y), 3
    split = np.where(np.arange(n) < 400, "train", "test")
    columns: dict[str, list] = {c: [] for c in ("logits", "noisy_logits", "linf", "l2", "attack")}
    for name, images in parts.items():
        noisy = np.clip(images[:, None, :] + rng.normal(0, 0.05, (n, k, images.shape[1])), 0, 1)
        columns["logits"].append(model.decision_function(images))
        columns["noisy_logits"].append(model.decision_function(noisy.reshape(n * k, -1)).reshape(n, k, -1))
        columns["linf"].append(np.abs(images - x).max(axis=1))
        columns["l2"].append(np.linalg.norm(images - x, axis=1))
        columns["attack"] += [name] * n
    return LogitTable.from_arrays(
        sample_id=np.tile(np.arange(n), 3), split=np.tile(split, 3), label=np.tile(y, 3),
        **{c: np.concatenate(v) if c != "attack" else np.array(v) for c, v in columns.items()},
        metadata={"class_names": [f"digit-{i}" for i in range(10)], "dataset": {"name": "digits"}},
    )


@pytest.fixture(scope="session")
def digits_train(digits_split_table) -> LogitTable:
    """The train rows of `digits_split_table`: what defenses are fitted on (fits take the rows they are given)."""
    return digits_split_table.select(split="train")


@pytest.fixture(scope="session")
def digits_test(digits_split_table) -> LogitTable:
    """The test rows of `digits_split_table`: what evaluations are measured on."""
    return digits_split_table.select(split="test")


@pytest.fixture(scope="session")
def noisy_guard(digits_split_table):
    """A guard on digits that reads noise queries: learned-noisy detector at 1% FPR, reject; C=10, K=3."""
    from logitguard.evaluation.guard import fit_guard

    return fit_guard(digits_split_table)


@pytest.fixture(scope="session")
def plain_guard(digits_split_table):
    """A guard on digits without noise queries: MSP detector and SVM corrector, correct."""
    from logitguard.evaluation.guard import fit_guard

    return fit_guard(digits_split_table, detector="msp", corrector="svm", on_flag="correct")


@pytest.fixture(scope="session")
def digits_split_dir(digits_split_table, tmp_path_factory):
    """`digits_split_table` written as a hive-partitioned directory (split=…/attack=…), as producers write."""
    from logitguard import write_table

    path = tmp_path_factory.mktemp("digits-split") / "table"
    write_table(digits_split_table, path, partition_by=("split", "attack"))
    return path


def linear_insen(model, x: np.ndarray) -> np.ndarray:
    """The ``insen`` column (N, 5) of the logistic regression: its exact InSen map |W^T (softmax - onehot(ŷ))|,
    summarised by `producers.models.insen.insen_summary`."""
    import torch

    from producers.models.insen import insen_summary

    z = model.decision_function(x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(x)), z.argmax(axis=1)] -= 1.0
    return insen_summary(torch.from_numpy(np.abs(p @ model.coef_))).numpy()


@pytest.fixture(scope="session")
def digits_feature_table(digits_model, digits_split_table) -> LogitTable:
    """`digits_split_table` plus the two columns feature detectors read: ``features`` (the 64 pixels, the
    logistic regression's only "layer") and ``insen`` (`linear_insen`)."""
    model, x, y = digits_model
    images = np.concatenate([x, linear_fgsm(model, x, y, DIGITS_EPS), linear_bim(model, x, y, DIGITS_EPS)])
    t = digits_split_table
    return LogitTable.from_arrays(
        logits=t.logits, sample_id=t.sample_id, split=t.split, attack=t.attack, label=t.labels,
        noisy_logits=t.noisy_logits, linf=t.column("linf"), l2=t.column("l2"), features=images,
        insen=linear_insen(model, images), metadata=t.metadata)


@pytest.fixture(scope="session")
def digits_cnn_guard(digits_cnn, digits_sets, tmp_path_factory):
    """A guard (learned-noisy, 5% FPR, rejects) fitted on `digits_cnn`'s logits: clean and FGSM rows of the
    digits splits with K = 8 noise queries of the default recipe, made by the producer (torch)."""
    from logitguard.evaluation.guard import fit_guard
    from producers.data.noise import DEFAULT_NOISE, NoiseRecipe
    from producers.export.logits import export

    train, test = digits_sets
    out = tmp_path_factory.mktemp("digits-cnn") / "table"
    export(digits_cnn, {"train": train, "test": test}, attacks=["clean", "fgsm"], out=out,
           samples={"train": 600, "test": 200}, attack_params={"fgsm": {"eps": 0.15}},
           noise=NoiseRecipe.parse(DEFAULT_NOISE, 8), progress=False)
    return fit_guard(out, detector="learned-noisy", fpr=0.05, budgets=(0.15,))
