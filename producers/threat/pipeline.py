"""A gated pipeline of two mirrors (`producers.threat.mirrors`), for attacks that know the whole defense.

`PipelineMirror` is `GatedDefense` as a torch module: ``forward`` gives what an attack's loss reads
(`PipelineOutput`: the detector's differentiable score and threshold, the corrector's class scores),
``decide`` the core's final labels through the core's own rule (`logitguard.defenses.math.gate.gate`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from logitguard.defenses.gated import ON_FLAG
from logitguard.defenses.decision import ABSTAIN
from logitguard.defenses.math.gate import gate

from ..errors import ProducerError
from .mirrors import CorrectorMirror, DetectorMirror, load_corrector_mirror, load_detector_mirror

__all__ = ["ABSTAIN", "PipelineMirror", "PipelineOutput", "load_pipeline_mirror"]


class PipelineOutput(NamedTuple):
    """What a pipeline sees: the model's logits (B, C), the detector's score (B,) and threshold (None
    without a detector: every row is flagged), and the corrector's class scores (B, C) (None without)."""

    logits: Tensor
    score: Tensor | None
    threshold: float | None
    corrected: Tensor | None


class PipelineMirror(nn.Module):
    """`GatedDefense` as a torch module: flagged rows are corrected, rejected, or kept when the corrector
    agrees with the model (`on_flag` = "correct", "reject", "agree"); other rows keep the argmax.

    No detector: every row is flagged. No detector and no corrector: the bare model.
    """

    def __init__(self, detector: DetectorMirror | None, corrector: CorrectorMirror | None,
                 on_flag: str = "correct") -> None:
        super().__init__()
        if on_flag not in ON_FLAG:
            raise ProducerError(f"on_flag must be one of {', '.join(ON_FLAG)}; got {on_flag!r}")
        if corrector is None and detector is not None and on_flag != "reject":
            raise ProducerError(f"on_flag={on_flag!r} needs a corrector")
        self.detector, self.corrector, self.on_flag = detector, corrector, on_flag
        self.needs_noise = any(m is not None and m.needs_noise for m in (detector, corrector))
        # The table column the detector reads besides the logits: an attack computes it from the model and x.
        self.input_column = None if detector is None else detector.input_column

    def forward(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> PipelineOutput:
        """`features`: the detector's `input_column` rows (B, F), for detectors that read one."""
        score = None if self.detector is None else self.detector.score(logits, noisy, features)
        corrected = None if self.corrector is None else self.corrector(logits, noisy)
        threshold = None if self.detector is None else self.detector.threshold
        return PipelineOutput(logits, score, threshold, corrected)

    @torch.no_grad()
    def flagged(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Flags (B,) bool; all True without a detector."""
        if self.detector is None:
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        return self.detector.flags(logits, noisy, features)

    @torch.no_grad()
    def decide(self, logits: Tensor, noisy: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Final labels (B,) int64, `ABSTAIN` (-1) for rejected rows, equal to the core's `GatedDefense` (for
        a detector with an `input_column`, which the core's gated defense refuses: the same rule)."""
        model = logits.argmax(dim=1)
        if self.detector is None and self.corrector is None:
            return model
        flagged = self.flagged(logits, noisy, features)
        corrected = None if self.on_flag == "reject" else self.corrector.labels(logits, noisy)
        return gate(model, flagged, corrected, self.on_flag)

    def extra_repr(self) -> str:
        return f"on_flag={self.on_flag!r}"



def load_pipeline_mirror(spec: Any, *, temperature: float = 0.25) -> PipelineMirror:
    """The mirror of a pipeline spec: anything with ``detector`` and ``corrector`` (paths or None) and
    ``on_flag`` (a `logitguard.defenses.pipelines.PipelineSpec`)."""
    detector = None if spec.detector is None else load_detector_mirror(spec.detector)
    corrector = None if spec.corrector is None else load_corrector_mirror(spec.corrector, temperature=temperature)
    return PipelineMirror(detector, corrector, getattr(spec, "on_flag", "correct"))
