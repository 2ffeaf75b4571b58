"""The Ray engine: apply a saved defense to a logit table with Ray Data, on one machine or a cluster
(``--engine ray``; the 'ray' extra; docs/scale.md). One module per job:

- `connection`: `init_ray`, and `RayErrors` (our errors raised inside Ray, brought back as themselves);
- `io`: `read_ray` (a datasource with the local reader's rules) and `write_ray` (a datasink with the local
  writer's encodings, committed in one step);
- `actors`: `apply_ray`, a pool of actors moving batches through the one apply path
  (`logitguard.defenses.apply.apply_batch`), with the decisions beside the rows;
- `jobs`: `correct`, `detect`, `defend`, returning what the streamed engine returns; reports come from the
  rows' decisions through `logitguard.engines.report`, so they equal the streamed reports.
"""

from __future__ import annotations

from .actors import KINDS, DefenseSpec, apply_ray
from .connection import RayErrors, init_ray
from .io import read_ray, table_metadata, write_ray
from .jobs import correct, defend, detect

__all__ = ["KINDS", "DefenseSpec", "RayErrors", "apply_ray", "correct", "defend", "detect", "init_ray", "read_ray",
           "table_metadata", "write_ray"]
