"""One contract test over every registered attack: shape, pixel range, budget, and it really attacks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from producers.attacks import ATTACK_NAMES, make_attack
from producers.errors import ProducerError

# Small settings so the whole battery runs in seconds on digits; attack-specific checks against ART
# live in test_attacks_linf.py and test_attacks_minimal.py.
FAST = {"fgsm": {"eps": 0.1}, "bim": {"eps": 0.1, "steps": 5}, "pgd": {"eps": 0.1, "alpha": 0.03, "steps": 5},
        "mim": {"eps": 0.1, "steps": 5}, "deepfool": {"max_iter": 20}, "cw": {"steps": 10, "binary_search_steps": 2}}
LINF_BUDGET = {"fgsm", "bim", "pgd", "mim"}


def test_every_registered_attack_has_fast_settings():
    assert set(FAST) == set(ATTACK_NAMES)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_contract(name, digits_cnn, digits_sets):
    _, test = digits_sets
    idx = np.arange(96)
    x, y = test.load(idx), torch.as_tensor(test.labels[idx])
    was_training = digits_cnn.training
    attack = make_attack(name, digits_cnn, batch_size=40, **FAST[name])
    calls = []
    adv = attack(x, y, generator=torch.Generator().manual_seed(0), on_batch=calls.append)
    assert calls == [40, 40, 16]  # batching is the base class's, with progress per batch
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert adv.min() >= 0 and adv.max() <= 1
    assert digits_cnn.training == was_training
    if name in LINF_BUDGET:
        assert (adv - x).abs().max() <= FAST[name]["eps"] + 1e-6
    assert attack.params() == {k: getattr(attack, k) for k in attack.param_names}
    with torch.no_grad():
        clean_acc = (digits_cnn(x).argmax(1) == y).float().mean()
        robust_acc = (digits_cnn(adv).argmax(1) == y).float().mean()
    assert robust_acc < clean_acc - 0.2, (name, clean_acc, robust_acc)


def test_unknown_attack_name():
    with pytest.raises(ProducerError, match=re.escape(
            "unknown attack 'pgdd'; known: ['fgsm', 'bim', 'pgd', 'mim', 'deepfool', 'cw'] or art:<ClassName>")):
        make_attack("pgdd", torch.nn.Identity())
