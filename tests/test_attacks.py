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


def test_deepfool_batched_rival_gradients_equal_one_backward_per_rival(digits_cnn, digits_sets):
    """The single vmapped backward gives the same (b, k-1, C, H, W) gradients as k-1 separate backwards."""
    _, test = digits_sets
    x = test.load(np.arange(16)).requires_grad_(True)
    attack = make_attack("deepfool", digits_cnn)
    logits = digits_cnn.eval()(x)
    ranked = logits.topk(4, dim=1).indices
    gaps = logits.gather(1, ranked[:, 1:]) - logits.gather(1, ranked[:, :1])
    directions = torch.eye(3)[:, None, :].expand(3, len(x), 3)
    batched = attack.input_gradient(gaps, x, grad_outputs=directions, is_grads_batched=True, retain_graph=True)
    looped = torch.stack([torch.autograd.grad(gaps[:, j].sum(), x, retain_graph=True)[0] for j in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_attacks_stay_close_to_fp32(precision, digits_cnn, digits_sets):
    """Autocast changes the arithmetic, not the attack: robust accuracy within a few points of fp32 (CPU
    autocast here; docs/producers.md has the GPU figures), and the metadata records the precision."""
    _, test = digits_sets
    idx = np.arange(200)
    x, y = test.load(idx), torch.as_tensor(test.labels[idx])
    params = {"eps": 0.15, "alpha": 0.03, "steps": 10}
    robust = {}
    for p in ("fp32", precision):
        adv = make_attack("pgd", digits_cnn, precision=p, **params)(x, y, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust[p] = float((digits_cnn(adv).argmax(1) == y).float().mean())
    assert robust["fp32"] < 0.4  # the attack works at all
    assert abs(robust[precision] - robust["fp32"]) <= 0.05
    assert make_attack("pgd", digits_cnn, precision=precision).params()["precision"] == precision
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        make_attack("pgd", digits_cnn, precision="fp8")
    with pytest.raises(ValueError, match="DeepFool runs in fp32 only"):
        make_attack("deepfool", digits_cnn, precision=precision)
