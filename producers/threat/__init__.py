"""Threat models on the producer side: differentiable mirrors of saved defenses for adaptive attacks."""

from .mirrors import (
    ABSTAIN,
    CorrectorMirror,
    DetectorMirror,
    load_corrector_mirror,
    load_detector_mirror,
    mirror_corrector,
    mirror_detector,
)
from .pipeline import PipelineMirror, PipelineOutput, load_pipeline_mirror

__all__ = [
    "ABSTAIN", "CorrectorMirror", "DetectorMirror", "PipelineMirror", "PipelineOutput", "load_corrector_mirror",
    "load_detector_mirror", "load_pipeline_mirror", "mirror_corrector", "mirror_detector",
]
