"""Minimal-perturbation attacks (DeepFool, C&W L2) against ART's reference versions, and the ART adapter.

Our attacks must succeed on at least 95% as many samples as ART's with matching settings, with a mean
L2 of the successful perturbations no more than 1.5x ART's. Measured on the digits SmallCNN, first 100
correctly classified test images (one CPU thread):
  DeepFool  ours 100% / L2 0.61   ART 100% / L2 0.62
  C&W L2    ours 100% / L2 0.96   ART 100% / L2 0.97   (ours with Adam lr=0.01: 18% / L2 0.31)
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from producers.attacks import make_attack
from producers.attacks.cw import CarliniWagnerL2
from producers.attacks.deepfool import DeepFool
from producers.errors import ProducerError
from producers.models.classifiers import predict_logits

N_SAMPLES = 100  # ART's C&W takes ~15 s of CPU for these; more would blow the test budget


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """8x8 batches gain nothing from a second thread, and on a busy 2-core machine OpenMP spin-waiting
    made this file ~10x slower (measured: 324 s with 2 threads, 35 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def correct_samples(digits_cnn, digits_sets):
    """The first N_SAMPLES test images (N, 1, 8, 8) the model classifies correctly, and their labels (N,)."""
    _, test = digits_sets
    images, labels = test.all_images(), torch.as_tensor(test.labels)
    correct = predict_logits(digits_cnn, images).argmax(1) == labels
    return images[correct][:N_SAMPLES], labels[correct][:N_SAMPLES]


@pytest.fixture(scope="module")
def art_classifier(digits_cnn):
    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(digits_cnn, torch.nn.CrossEntropyLoss(), (1, 8, 8), 10, clip_values=(0.0, 1.0),
                             device_type="cpu")


def success_and_l2(model, images, labels, adversarial):
    """Fraction of samples no longer classified as their label, and the mean L2 of those perturbations."""
    adversarial = torch.as_tensor(np.asarray(adversarial))
    fooled = predict_logits(model, adversarial).argmax(1) != labels
    l2 = (adversarial - images).flatten(1).norm(dim=1)
    return fooled.float().mean().item(), l2[fooled].mean().item()


def test_deepfool_matches_art(digits_cnn, correct_samples, art_classifier):
    from art.attacks.evasion import DeepFool as ARTDeepFool

    images, labels = correct_samples
    ours = DeepFool(digits_cnn, max_iter=100, overshoot=0.02, candidates=10)(images, labels)
    art = ARTDeepFool(art_classifier, max_iter=100, epsilon=0.02, nb_grads=10, batch_size=len(images),
                      verbose=False).generate(images.numpy())
    our_rate, our_l2 = success_and_l2(digits_cnn, images, labels, ours)
    art_rate, art_l2 = success_and_l2(digits_cnn, images, labels, art)
    assert our_rate >= 0.95 * art_rate
    assert our_l2 <= 1.5 * art_l2
    assert ours.min() >= 0 and ours.max() <= 1


def test_cw_matches_art(digits_cnn, correct_samples, art_classifier):
    from art.attacks.evasion import CarliniL2Method

    images, labels = correct_samples
    ours = CarliniWagnerL2(digits_cnn, binary_search_steps=4, steps=25, c_init=10, confidence=0)(images, labels)
    # ART's learning_rate is the start of a halving/doubling line search, not an Adam rate; 0.01 is its
    # own usual setting, while Adam over only 25 steps needs our larger default (see cw.py)
    art = CarliniL2Method(art_classifier, confidence=0.0, learning_rate=0.01, binary_search_steps=4, max_iter=25,
                          initial_const=10, batch_size=len(images), verbose=False).generate(images.numpy(),
                                                                                            labels.numpy())
    our_rate, our_l2 = success_and_l2(digits_cnn, images, labels, ours)
    art_rate, art_l2 = success_and_l2(digits_cnn, images, labels, art)
    assert our_rate >= 0.95 * art_rate
    assert our_l2 <= 1.5 * art_l2
    assert ours.min() >= 0 and ours.max() <= 1


def test_cw_returns_the_original_where_it_never_succeeds(digits_cnn, correct_samples):
    images, labels = correct_samples
    # no optimisation step: only the (correctly classified) starting points are scored
    adversarial = CarliniWagnerL2(digits_cnn, steps=0, binary_search_steps=1)(images, labels)
    assert torch.equal(adversarial, images)


def test_params_are_reported_unchanged(digits_cnn):
    assert DeepFool(digits_cnn).params() == {"max_iter": 100, "overshoot": 0.02, "candidates": 10}
    assert CarliniWagnerL2(digits_cnn, lr=0.05).params() == {
        "steps": 25, "lr": 0.05, "binary_search_steps": 4, "c_init": 10.0, "confidence": 0.0}


def test_art_adapter_runs_an_art_attack(digits_cnn, correct_samples):
    pytest.importorskip("art")
    images, labels = correct_samples
    attack = make_attack("art:FastGradientMethod", digits_cnn, eps=0.1)
    assert attack.name == "art:FastGradientMethod"
    assert attack.params() == {"attack_name": "FastGradientMethod", "eps": 0.1}
    adversarial = attack(images, labels)
    assert adversarial.shape == images.shape
    assert (adversarial - images).abs().max() <= 0.1 + 1e-6
    accuracy = (predict_logits(digits_cnn, adversarial).argmax(1) == labels).float().mean().item()
    assert accuracy < 0.9  # every clean sample here is classified correctly


def test_art_adapter_unknown_names(digits_cnn):
    pytest.importorskip("art")
    with pytest.raises(ProducerError) as excinfo:
        make_attack("art:NoSuchAttack", digits_cnn)
    assert str(excinfo.value) == (
        "unknown ART evasion attack 'NoSuchAttack'; the names are the classes in art.attacks.evasion, "
        "e.g. 'FastGradientMethod' or 'SquareAttack' "
        "(list them with: python -c \"import art.attacks.evasion as e; print(dir(e))\")"
    )
    with pytest.raises(ProducerError, match=r"takes no parameter\(s\) \['epsilon'\]"):
        make_attack("art:FastGradientMethod", digits_cnn, epsilon=0.1)


def test_art_adapter_without_art(digits_cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "art.attacks", None)  # makes `import art.attacks` fail
    with pytest.raises(ProducerError) as excinfo:
        make_attack("art:FastGradientMethod", digits_cnn)
    assert str(excinfo.value) == (
        "attack art:FastGradientMethod needs ART; install it with `pip install adversarial-robustness-toolbox`"
    )
