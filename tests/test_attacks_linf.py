"""Our L-inf attacks (FGSM, BIM, PGD, MIM) cross-checked against ART on the same digits CNN.

Both sides attack the `digits_cnn` fixture on the digits test split with the same eps, step size and
step count. FGSM, BIM and MIM are deterministic and follow the same update as ART's PyTorch code path
(ART's MIM is its PGD with `decay`, which also accumulates the per-sample L1-normalised gradient), so
their adversarials agree pixel for pixel up to float rounding. PGD differs only in its random start
(ART draws from NumPy's global RNG, we from a torch.Generator), so only its accuracy is compared.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

pytest.importorskip("art")

from art.attacks.evasion import (  # noqa: E402
    BasicIterativeMethod,
    FastGradientMethod,
    MomentumIterativeMethod,
    ProjectedGradientDescent,
)
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from producers.attacks import make_attack  # noqa: E402

# eps = 0.1 on 8x8 digits leaves roughly 50-55% robust accuracy from ~93% clean: informative, not saturated.
EPS, STEPS = 0.1, 10
ALPHA = EPS / STEPS  # BIM and MIM: the papers' eps / steps
PGD_ALPHA = EPS / 4  # PGD: a larger step, as with Madry et al.'s 2/255 per step inside 8/255

OURS = {
    "fgsm": {"eps": EPS},
    "bim": {"eps": EPS, "alpha": ALPHA, "steps": STEPS},
    "pgd": {"eps": EPS, "alpha": PGD_ALPHA, "steps": STEPS, "random_start": True},
    "mim": {"eps": EPS, "alpha": ALPHA, "steps": STEPS, "decay": 1.0},
}


def art_attack(name: str, classifier: PyTorchClassifier):
    common = {"norm": np.inf, "eps": EPS, "batch_size": 256}
    if name == "fgsm":
        return FastGradientMethod(classifier, **common)
    if name == "bim":
        return BasicIterativeMethod(classifier, eps=EPS, eps_step=ALPHA, max_iter=STEPS, batch_size=256,
                                    verbose=False)
    if name == "pgd":
        return ProjectedGradientDescent(classifier, **common, eps_step=PGD_ALPHA, max_iter=STEPS,
                                        num_random_init=1, verbose=False)
    return MomentumIterativeMethod(classifier, **common, eps_step=ALPHA, max_iter=STEPS, decay=1.0, verbose=False)


@pytest.fixture(scope="module")
def attacked(digits_cnn, digits_sets):
    """name -> (clean images, labels, ours adversarial, ART adversarial), each attack run once."""
    _, test = digits_sets
    images, labels = test.all_images(), torch.as_tensor(test.labels)
    classifier = PyTorchClassifier(digits_cnn, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                                   nb_classes=10, clip_values=(0.0, 1.0))

    @cache
    def run(name: str):
        ours = make_attack(name, digits_cnn, **OURS[name])(images, labels, generator=torch.Generator().manual_seed(0))
        np.random.seed(0)  # ART's random start
        theirs = torch.from_numpy(art_attack(name, classifier).generate(images.numpy(), y=test.labels))
        return images, labels, ours, theirs

    return run


def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


@pytest.mark.parametrize("name", list(OURS))
def test_robust_accuracy_matches_art(name, attacked, digits_cnn):
    _, labels, ours, theirs = attacked(name)
    ours_acc, art_acc = accuracy(digits_cnn, ours, labels), accuracy(digits_cnn, theirs, labels)
    assert abs(ours_acc - art_acc) <= 0.05, f"{name}: ours {ours_acc:.3f} vs ART {art_acc:.3f}"


@pytest.mark.parametrize("name", ["fgsm", "bim", "mim"])
def test_deterministic_attacks_match_art_pixelwise(name, attacked):
    _, _, ours, theirs = attacked(name)
    # Rounding can flip the sign of a near-zero gradient entry now and then; allow a few such pixels.
    assert ((ours - theirs).abs() <= 1e-5).float().mean() >= 0.99


@pytest.mark.parametrize("name", list(OURS))
def test_adversarials_are_valid_and_hurt_accuracy(name, attacked, digits_cnn):
    images, labels, ours, _ = attacked(name)
    assert ours.shape == images.shape and ours.dtype == torch.float32
    assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    assert float((ours - images).abs().max()) <= EPS + 1e-6
    assert accuracy(digits_cnn, ours, labels) < accuracy(digits_cnn, images, labels)


def test_pgd_is_reproducible_with_a_seeded_generator(digits_cnn, digits_sets):
    _, test = digits_sets
    images, labels = test.all_images()[:64], torch.as_tensor(test.labels[:64])
    pgd = make_attack("pgd", digits_cnn, **OURS["pgd"])
    first, again, other = (pgd(images, labels, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # the generator really drives the random start


@pytest.mark.parametrize("name", list(OURS))
def test_params_report_the_arguments_unchanged(name, digits_cnn):
    attack = make_attack(name, digits_cnn, **OURS[name])
    assert set(attack.param_names) == set(OURS[name])
    assert attack.params().items() >= OURS[name].items()
