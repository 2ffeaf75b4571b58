"""Evaluation: how well defenses do on logit tables.

- `metrics`: per-row and aggregate metrics (accuracy, attack success, AUROC, thresholds at an FPR);
- `evaluate`: accuracy and detection tables, the transfer matrix, the p_clean sweep;
- `threat`: threat models, per-sample worst-case robustness per tier;
- `curves`: accuracy and detection rate against perturbation size per swept attack;
- `modelside`: logit-side defenses against model-side ones (adversarial training, RCE, GRED) per model.

Nothing is imported here: importing one module does not pull in the others.
"""
