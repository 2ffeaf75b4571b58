"""Defenses: everything that is fitted on logit tables, saved to a file and applied to logits.

- `estimator`: the one estimator contract (arrays first, scikit-learn's shape) and the one file format;
  `legacy`: reading the files of the formats before it (never written);
- `detectors`: detectors of attacked logits (baselines, odds test, learned, K-density, InSen);
  `detector_kinds`: their names (no imports, so the CLI lists them cheaply);
- `corrector` (trained by `corrector_training`, its torch network in `_corrector_net`) and `svm`: correctors that
  recover the true label;
- `gated`: detect-then-correct or reject (`GatedDefense`, ``on_flag``);
- `guard`: a deployable defense in one file; `pipelines`: pipeline manifests; `shipped`: the shipped recipe.

Nothing is imported here: importing one module does not pull in the others (nor torch).
"""
