"""Why the corrector decides as it does: supporting classes (seed §5, App. B) and attack similarity.

For an attacked row z* with true label i, the *supporting score* of class k is how much raising z_k
raises the corrected true-class logit relative to the corrected logits' mean:

    S_k = ∂g(z*)_i/∂z_k − (1/C) Σ_l ∂g(z*)_l/∂z_k,

with g the corrector network in eval mode (dropout off). Frequencies of supporting classes per attack are
compared with the Bhattacharyya coefficient; whether that similarity predicts how well a corrector trained
on one attack transfers to another is `rank_agreement`. One idea per module:

- `attribution`: supporting scores (closed form for the two-layer ReLU corrector, autograd for any torch
  module), the top-k supporting classes of a row (the true class left out), one row's view;
- `counts`: supporting-class frequencies per attack, the ablation test, both streamed over a table on
  disk (`explain_path`), and the mean-logit histogram counts;
- `similarity`: the Bhattacharyya coefficient between attacks' frequencies and its rank agreement with
  the corrector's transfer matrix.

Nothing here plots: the functions return arrays, dicts and DataFrames. Torch is needed (the ``train``
extra); without it importing this package is a `LogitguardError` that says so.
"""

from __future__ import annotations

from .attribution import Method, default_k, instance_view, supporting_scores, top_supporting
from .counts import ablation, explain_path, mean_logit_counts, supporting_frequencies, top_classes_per_attack
from .similarity import bhattacharyya, bhattacharyya_matrix, rank_agreement

__all__ = [
    "Method", "ablation", "bhattacharyya", "bhattacharyya_matrix", "default_k", "explain_path", "instance_view",
    "mean_logit_counts", "rank_agreement", "supporting_frequencies", "supporting_scores", "top_classes_per_attack",
    "top_supporting",
]
