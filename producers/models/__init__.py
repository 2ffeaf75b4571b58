"""Classifiers on the producer side: their networks (`networks`), building, saving and loading them
(`classifiers`), their training objectives (`training`), input sensitivity (`insen`) and the image-space
GRED defense (`gred`).

The names of `classifiers` (which has those of `networks`) are re-exported here: ``from producers.models import
load_model`` keeps working.
"""

from .classifiers import (IMAGENET_MEAN, IMAGENET_STD, JUMPRELU_DEFAULT_K, ZOO_ARCHS, ImageClassifier, JumpReLU,
                          Normalize, SmallCNN, accuracy, build_model, build_with_state, import_torchvision,
                          load_model, parse_activation, predict_logits, read_state, resolve_model, save_model,
                          save_state, small_cnn_for, train_classifier)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "JUMPRELU_DEFAULT_K", "ZOO_ARCHS", "ImageClassifier", "JumpReLU", "Normalize",
    "SmallCNN", "accuracy", "build_model", "build_with_state", "import_torchvision", "load_model", "parse_activation",
    "predict_logits", "read_state", "resolve_model", "save_model", "save_state", "small_cnn_for", "train_classifier",
]
