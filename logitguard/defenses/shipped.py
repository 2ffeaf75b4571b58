"""The shipped pipelines: the demo's defenses, fitted with fixed settings and saved as one manifest.

One recipe serves twice. `make data` fits it on the embedded table and saves the files the report's
threat-model section is measured against (``data/defenses/``); the *surrogate* threat model runs the
same recipe on the attacker's own, disjoint samples (the attacker knows the algorithm and settings but
not the defender's files) and attacks through that copy.

Pipelines (see docs/threat-models.md for what each policy does):

============== ===================== ===================== =========
name           detector              corrector             on_flag
============== ===================== ===================== =========
none           –                     –                     –
corrector      –                     corrector(pgd)        (every row)
ln-corrector   learned-noisy @ 1%    corrector(pgd)        correct
ln-odds        learned-noisy @ 1%    odds, logistic rule   correct
odds-odds      odds @ 5%             odds, logistic rule   correct
ln-reject      learned-noisy @ 1%    –                     reject
ln-agree       learned-noisy @ 1%    odds, logistic rule   agree
============== ===================== ===================== =========
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import refuse_overwrite, staged_output
from .pipelines import MANIFEST
from ..errors import LogitguardError
from ..tables import CLEAN, LogitTable, require_one_split
from ..tables.threat import threat_of

# The demo's corrector settings (see report.demo_text.DEMO_CORRECTOR): within a point of the paper's defaults here.
CORRECTOR = {"hidden": 1000, "epochs": 30, "lr": 1e-3, "attack": "pgd"}
DETECTOR_FPR = {"learned-noisy": 0.01, "odds": 0.05}
FILES = {"corrector": "corrector-pgd.npz", "learned-noisy": "learned-noisy.npz", "odds": "odds-logistic.npz"}
PIPELINES: dict[str, dict[str, str]] = {
    "none": {},
    "corrector": {"corrector": FILES["corrector"]},
    "ln-corrector": {"detector": FILES["learned-noisy"], "corrector": FILES["corrector"], "on_flag": "correct"},
    "ln-odds": {"detector": FILES["learned-noisy"], "corrector": FILES["odds"], "on_flag": "correct"},
    "odds-odds": {"detector": FILES["odds"], "corrector": FILES["odds"], "on_flag": "correct"},
    "ln-reject": {"detector": FILES["learned-noisy"], "on_flag": "reject"},
    "ln-agree": {"detector": FILES["learned-noisy"], "corrector": FILES["odds"], "on_flag": "agree"},
}


def fit_shipped(table: LogitTable, out: str | os.PathLike, *, seed: int = 0, overwrite: bool = False,
                attacks: list[str] | None = None, pipelines: Sequence[str] | None = None,
                provenance: Mapping[str, Any] | None = None) -> Path:
    """Fit the shipped pipelines' parts on the rows of `table` (one split: the ``train`` rows,
    ``table.select(split="train")``) and write them plus a manifest.

    `attacks` limits the attacked rows the supervised detectors learn from (default: every oblivious and
    transfer attack in the table; partitions aimed at a defense's files, such as adaptive ones attacked on the
    train split, are learned from only when named). `pipelines` fits only the files these shipped pipelines
    need and writes a manifest of them alone (default: all). `provenance` is stored in the manifest
    (`logitguard.defenses.pipelines.manifest_provenance`). Returns the manifest's path, ``out/defenses.json``.
    """
    from .corrector import LogitCorrector
    from .detectors import make_detector
    from .pipelines import save_pipelines

    require_one_split(table, "fitting the shipped pipelines", hint="train")
    chosen = list(PIPELINES) if pipelines is None else list(dict.fromkeys(pipelines))
    unknown = sorted(set(chosen) - set(PIPELINES))
    if unknown or not chosen:
        raise LogitguardError(f"the shipped pipelines are {', '.join(PIPELINES)}; got {unknown or chosen}")
    needed = {value for name in chosen for part, value in PIPELINES[name].items() if part != "on_flag"}
    out = Path(out)
    refuse_overwrite([out / name for name in (*sorted(needed), MANIFEST)], overwrite)
    if table.noisy_logits is None:
        raise LogitguardError("the shipped pipelines need noise queries (column 'noisy_logits')")
    if attacks is None:
        attacks = [a for a in table.attacks if a != CLEAN
                   and threat_of(table.metadata, a)["model"] in ("oblivious", "transfer")]
    settings = {k: v for k, v in CORRECTOR.items() if k != "attack"}
    # Written beside `out` and added to it in one step: `out` never holds some new files with an old manifest.
    with staged_output(out, overwrite=overwrite) as stage:
        if FILES["corrector"] in needed:
            corrector = LogitCorrector(**settings, seed=seed, progress=False).fit_table(table, CORRECTOR["attack"])
            corrector.save(stage / FILES["corrector"])
        if FILES["learned-noisy"] in needed:
            learned = make_detector("learned-noisy", fpr=DETECTOR_FPR["learned-noisy"], seed=seed)
            learned.fit_table(table, attacks=attacks).save(stage / FILES["learned-noisy"])
        if FILES["odds"] in needed:
            odds = make_detector("odds", fpr=DETECTOR_FPR["odds"], correction="logistic").fit_table(table, attacks=attacks)
            odds.save(stage / FILES["odds"])
        specs = {name: {part: (value if part == "on_flag" else stage / value) for part, value in PIPELINES[name].items()}
                 for name in chosen}
        save_pipelines(stage / MANIFEST, specs, provenance=provenance)
    return out / MANIFEST

