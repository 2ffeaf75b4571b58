"""Export: logit tables from a model, a dataset and attacks (`logits`), and the same on Ray actors (`scale`).

The names of `logits` are re-exported here: ``from producers.export import export`` keeps working.
"""

from .logits import (ALIAS_PATTERN, PARAM_RANGES, SPLITS, TRANSFER_PREFIX, AttackSpec, ExportReport, ExportStage,
                     Shard, Sweep, check_attack_params, check_sample_counts, expand_sweeps, export, export_partition,
                     partition_mismatch, plan_attacks, select_samples, sweep_alias)

__all__ = [
    "ALIAS_PATTERN", "PARAM_RANGES", "SPLITS", "TRANSFER_PREFIX", "AttackSpec", "ExportReport", "ExportStage", "Shard",
    "Sweep", "check_attack_params", "check_sample_counts", "expand_sweeps", "export", "export_partition",
    "partition_mismatch", "plan_attacks", "select_samples", "sweep_alias",
]
