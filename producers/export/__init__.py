"""Export: logit tables from a model, a dataset and attacks (`logits`), and the same on Ray actors (`scale`).

`logits.export` makes an `ExportPlan` (`plan`: what to export, checked once; the attack requests in
`attack_specs`) and runs it (`execute`, staging in `staging`). Their names are re-exported here:
``from producers.export import export`` keeps working.
"""

from .logits import (ALIAS_PATTERN, PARAM_RANGES, SPLITS, TRANSFER_PREFIX, AttackSpec, ExportPlan, ExportReport,
                     ExportStage, PartitionJob, Shard, Sweep, check_attack_params, check_existing, check_sample_counts,
                     expand_sweeps, export, export_partition, partition_mismatch, plan_attacks, run_export,
                     select_samples, sweep_alias)

__all__ = [
    "ALIAS_PATTERN", "PARAM_RANGES", "SPLITS", "TRANSFER_PREFIX", "AttackSpec", "ExportPlan", "ExportReport",
    "ExportStage", "PartitionJob", "Shard", "Sweep", "check_attack_params", "check_existing", "check_sample_counts",
    "expand_sweeps", "export", "export_partition", "partition_mismatch", "plan_attacks", "run_export",
    "select_samples", "sweep_alias",
]
