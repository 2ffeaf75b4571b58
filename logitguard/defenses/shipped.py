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
from pathlib import Path

from ..files import refuse_overwrite, staged_output
from ..errors import LogitguardError
from ..tables import LogitTable, require_one_split

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
MANIFEST = "defenses.json"


def fit_shipped(table: LogitTable, out: str | os.PathLike, *, seed: int = 0, overwrite: bool = False,
                attacks: list[str] | None = None) -> Path:
    """Fit the shipped pipelines' parts on the rows of `table` (one split: the ``train`` rows,
    ``table.select(split="train")``) and write them plus a manifest.

    `attacks` limits the attacked rows the supervised detectors learn from (default: every attack in the
    table). Returns the manifest's path, ``out/defenses.json``.
    """
    from .corrector import LogitCorrector
    from .detectors import make_detector
    from .pipelines import save_pipelines

    require_one_split(table, "fitting the shipped pipelines", hint="train")
    out = Path(out)
    refuse_overwrite([out / name for name in (*FILES.values(), MANIFEST)], overwrite)
    if table.noisy_logits is None:
        raise LogitguardError("the shipped pipelines need noise queries (column 'noisy_logits')")
    settings = {k: v for k, v in CORRECTOR.items() if k != "attack"}
    # Written beside `out` and added to it in one step: `out` never holds some new files with an old manifest.
    with staged_output(out, overwrite=overwrite) as stage:
        corrector = LogitCorrector(**settings, seed=seed, progress=False).fit_table(table, CORRECTOR["attack"])
        corrector.save(stage / FILES["corrector"])
        learned = make_detector("learned-noisy", fpr=DETECTOR_FPR["learned-noisy"], seed=seed)
        learned.fit_table(table, attacks=attacks).save(stage / FILES["learned-noisy"])
        odds = make_detector("odds", fpr=DETECTOR_FPR["odds"], correction="logistic").fit_table(table, attacks=attacks)
        odds.save(stage / FILES["odds"])
        pipelines = {name: {part: (value if part == "on_flag" else stage / value) for part, value in parts.items()}
                     for name, parts in PIPELINES.items()}
        save_pipelines(stage / MANIFEST, pipelines)
    return out / MANIFEST

