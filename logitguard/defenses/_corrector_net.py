"""The torch side of the logit corrector: its network (C → D → C) and a fast dropout.

Imported only to train, to run on a GPU, or where a torch module is asked for (`LogitCorrector.model_`,
`logitguard.explain`, the mirrors in `producers`); applying a saved corrector on the CPU needs NumPy
only (`logitguard.defenses.corrector`).
"""

from __future__ import annotations

import torch
from torch import nn


class FastDropout(nn.Module):
    """Inverted dropout like `nn.Dropout`, drawing its mask from 16-bit random words.

    CPU `bernoulli_` draws one random number per element and took 65% of a training step at D=10,000;
    16-bit words (four per 64-bit draw) make the step about 3x faster. The drop probability is
    rounded to a multiple of 1/65536. No parameters, so saved weights match `nn.Dropout`'s layout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self._threshold = round(p * 65536) - 32768  # keep where the signed 16-bit word >= threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        words = torch.randint(-(1 << 63), (1 << 63) - 1, ((x.numel() + 3) // 4,), dtype=torch.int64,
                              device=x.device).view(torch.int16)[: x.numel()].view(x.shape)
        return x * (words >= self._threshold).to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def build_mlp(num_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    """C → D → C with ReLU and dropout after the hidden layer (Algorithm 1's network).

    Its ``state_dict`` keys are those of `logitguard.defenses.corrector.WEIGHT_KEYS`.
    """
    return nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(), FastDropout(dropout), nn.Linear(hidden, num_classes))
