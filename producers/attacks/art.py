"""Any evasion attack of the Adversarial Robustness Toolbox (ART), by class name, behind our `Attack`.

ART is optional (the ``dev`` extra). The model is wrapped in ART's `PyTorchClassifier` with pixels
in [0, 1]; ART's attacks read and write NumPy arrays, so each batch makes a round trip to the CPU.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ProducerError
from .base import Attack

_INSTALL_HINT = "pip install adversarial-robustness-toolbox"


class ARTAttack(Attack):
    """The ART evasion attack `attack_name` (e.g. ``SquareAttack``, ``FastGradientMethod``).

    `params` go to the ART class unchanged. Two defaults differ from ART's: the attack's own
    ``batch_size`` (when it has one) is our `batch_size`, and ``verbose`` is False unless given, so
    ART's progress bars stay quiet. When `__call__` gets a `generator`, ART's NumPy randomness is
    seeded from it for the batch and NumPy's global state is restored afterwards.

    Parameters
    ----------
    model, batch_size, device : see `Attack`.
    attack_name : a class name from ``art.attacks.evasion``.
    **params : keyword arguments of that class.
    """

    name = "art"

    def __init__(self, model: nn.Module, *, attack_name: str, batch_size: int = 256,
                 device: str | torch.device | None = None, **params: Any):
        super().__init__(model, batch_size=batch_size, device=device)
        self.attack_name = attack_name
        self.attack_params = params
        self.name = f"art:{attack_name}"  # type: ignore[misc]  # one instance per ART class
        self._art_class = _art_attack_class(attack_name)
        _check_param_names(self._art_class, attack_name, params)
        self._attack: Any = None
        self._input_shape: tuple[int, ...] | None = None

    def params(self) -> dict[str, Any]:
        return {"attack_name": self.attack_name, **self.attack_params}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adversarial batch (B, C, H, W) from ART's ``generate(x, y)`` with the true labels `y` (B,)."""
        if self._attack is None or self._input_shape != tuple(x.shape[1:]):
            self._attack = self._build(x)
            self._input_shape = tuple(x.shape[1:])
        x_np = x.detach().cpu().numpy().astype(np.float32)
        y_np = y.detach().cpu().numpy()
        saved_state = np.random.get_state()
        try:
            if generator is not None:
                seed = torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device).item()
                np.random.seed(int(seed))
            adv = self._attack.generate(x_np, y=y_np)
        finally:
            if generator is not None:
                np.random.set_state(saved_state)
        return torch.as_tensor(np.asarray(adv, dtype=np.float32), device=x.device)

    def _build(self, x: torch.Tensor) -> Any:
        """The ART attack on a `PyTorchClassifier` shaped for batches like `x`."""
        from art.estimators.classification import PyTorchClassifier

        with torch.no_grad():
            nb_classes = self.model(x[:1]).shape[1]
        classifier = PyTorchClassifier(
            model=self.model,
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(x.shape[1:]),
            nb_classes=nb_classes,
            clip_values=(0.0, 1.0),
            device_type="gpu" if self.device.type == "cuda" else "cpu",
        )
        accepted = inspect.signature(self._art_class.__init__).parameters
        defaults = {"batch_size": self.batch_size, "verbose": False}
        kwargs = {k: v for k, v in defaults.items() if k in accepted} | self.attack_params
        try:
            return self._art_class(classifier, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ProducerError(
                f"cannot build ART attack {self.attack_name} with {self.attack_params}: {exc}") from None


def _art_attack_class(attack_name: str) -> type:
    """The class `attack_name` from ``art.attacks.evasion``; ProducerError when ART or the class is missing."""
    try:
        from art.attacks import EvasionAttack
        from art.attacks import evasion
    except ImportError:
        raise ProducerError(f"attack art:{attack_name} needs ART; install it with `{_INSTALL_HINT}`") from None
    cls = getattr(evasion, attack_name, None)
    if not (isinstance(cls, type) and issubclass(cls, EvasionAttack)):
        raise ProducerError(
            f"unknown ART evasion attack {attack_name!r}; the names are the classes in art.attacks.evasion, "
            "e.g. 'FastGradientMethod' or 'SquareAttack' "
            "(list them with: python -c \"import art.attacks.evasion as e; print(dir(e))\")"
        )
    return cls


def _check_param_names(art_class: type, attack_name: str, params: dict[str, Any]) -> None:
    """Fail early, before any image is attacked, on a parameter the ART class does not take."""
    signature = inspect.signature(art_class.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    known = [name for name in signature.parameters if name not in ("self", "classifier", "estimator")]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ProducerError(f"ART attack {attack_name} takes no parameter(s) {unknown}; it takes {known}")
