"""Export clean and adversarial logits (with noise queries) as a partitioned logit table.

Layout: ``OUT/split=S/attack=A/shard-I-of-N.parquet``. A run stages its partitions beside ``OUT`` and adds
them to it in one step at the end (`ExportStage`): ``OUT`` never holds part of a run. A rerun skips
partitions ``OUT`` already holds (refusing ones made with other settings) and resumes from the ones an
interrupted run staged with the same settings; several processes (or GPUs) given different ``--shard I/N``
fill one dataset without overlap. Deterministic given the seed and the shard layout.

An attack may be run under an alias (``pgd-eps8=pgd``), so one table can hold the same attack at two
budgets; a sweep (`Sweep`, ``--sweep pgd.eps=2/255,4/255``) runs it once per value of one parameter,
each under its own alias, and records ``sweep`` in its metadata. With a `substitute` model the attacks
are computed through it (the transfer threat model) while every exported column is the target model's:
partitions ``transfer-<alias>``. Every attack partition records its threat model in the table metadata
under ``threat``.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from logitguard.files import StagedDirectory
from logitguard.defenses.decision import successful_attack
from logitguard.tables import CLEAN, METADATA_KEY, LogitTable, write_table
from logitguard.files import file_sha256

from .. import __version__
from ..attacks import attack_class, make_attack
from ..data.datasets import ImageSet
from ..errors import ProducerError
from ..models.insen import insen_stats
from ..models.classifiers import ImageClassifier, load_model
from ..data.noise import NoiseRecipe, noise_queries

SPLITS = ("train", "test")
TRANSFER_PREFIX = "transfer-"
ALIAS_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# The accepted range of every attack parameter the producer's own attacks take, checked before any work:
# (kind, lowest, lowest allowed?, highest). Budgets and step sizes are pixels in [0, 1].
PARAM_RANGES: dict[str, tuple[str, float | None, bool, float | None]] = {
    "eps": ("number", 0, False, 1), "alpha": ("number", 0, False, 1),
    "steps": ("integer", 1, True, None), "max_iter": ("integer", 1, True, None),
    "binary_search_steps": ("integer", 1, True, None), "candidates": ("integer", 2, True, None),
    "restarts": ("integer", 1, True, None), "eot": ("integer", 1, True, None),
    "check_draws": ("integer", 1, True, None), "search_steps": ("integer", 1, True, None),
    "lr": ("number", 0, False, None), "c_init": ("number", 0, False, None), "temperature": ("number", 0, False, None),
    "decay": ("number", 0, True, None), "overshoot": ("number", 0, True, None),
    "confidence": ("number", 0, True, None), "kappa": ("number", 0, True, None),
    "score_margin": ("number", 0, True, None),
    "random_start": ("boolean", None, True, None), "loss": ("ce|margin", None, True, None),
}


@dataclass(frozen=True)
class AttackSpec:
    """One requested attack: `name` (the alias; keys --param and --max-samples) runs attack `attack`."""

    name: str
    attack: str

    @classmethod
    def parse(cls, item: str) -> AttackSpec:
        """``"pgd"`` → (pgd, pgd); ``"pgd-eps8=pgd"`` → (pgd-eps8, pgd)."""
        alias, sep, attack = (s.strip() for s in item.partition("="))
        if not sep:
            return cls(alias, alias)
        if not ALIAS_PATTERN.fullmatch(alias):
            raise ProducerError(f"attack alias {alias!r} in {item!r} must be lowercase letters, digits, '-', '_' "
                                "or '.', starting with a letter or digit")
        if not attack:
            raise ProducerError(f"attack alias {item!r} names no attack; write ALIAS=ATTACK, e.g. pgd-eps8=pgd")
        if CLEAN in (alias, attack):
            raise ProducerError(f"{item!r}: '{CLEAN}' (the unattacked images) cannot be aliased or be an alias")
        if alias.startswith(TRANSFER_PREFIX):
            raise ProducerError(f"attack alias {alias!r}: the prefix {TRANSFER_PREFIX!r} is reserved for "
                                "transfer partitions (--substitute)")
        return cls(alias, attack)


def plan_attacks(
    attacks: Sequence[str],
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    attack_samples: Mapping[str, int] | None = None,
) -> list[AttackSpec]:
    """Parse and check the requested attacks before any work: names, aliases, parameters and caps.

    `attacks` holds names (``clean``, ``pgd``, ``art:SquareAttack``) or ``ALIAS=ATTACK`` items;
    `attack_params` and `attack_samples` are keyed by the alias (the name when there is none).
    """
    specs = [AttackSpec.parse(a) for a in attacks]
    if not specs:
        raise ProducerError("no attacks requested")
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ProducerError(f"attack name(s) {repeated} requested more than once; give each run its own alias, "
                            "e.g. pgd-eps8=pgd")
    unknown = sorted(set(attack_params or {}) - set(names))
    if unknown:
        raise ProducerError(f"parameters given for attack(s) {unknown} that are not being run")
    # Caps for attacks not run are ignored: one --max-samples list can serve several exports.
    for name, cap in (attack_samples or {}).items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ProducerError(f"sample cap for attack {name!r} must be a positive integer, got {cap!r}")
    for spec in specs:
        params = dict((attack_params or {}).get(spec.name, {}))
        if spec.attack == CLEAN:
            if params:
                raise ProducerError(f"'{CLEAN}' takes no parameters, got {sorted(params)}")
            continue
        _check_attack_params(spec, params)
    return specs


@dataclass(frozen=True)
class Sweep:
    """One attack run once per value of one parameter (``--sweep pgd.eps=2/255,4/255,8/255``).

    `attack` is an attack name or an alias from ``--attacks``; `values` holds (text as given, value) pairs,
    the text naming the partition (`sweep_alias`) and the value going to the attack.
    """

    attack: str
    param: str
    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """``ATTACK.PARAM``: what the core calls the curve (``logitguard curve --sweep pgd.eps``)."""
        return f"{self.attack}.{self.param}"


def sweep_alias(attack: str, param: str, text: str) -> str:
    """The partition name of one sweep value: ``pgd-eps-2of255`` for ``pgd.eps=2/255``, ``pgd-steps-20``,
    ``art-squareattack-eps-0.05`` (lowercased; ``/`` reads ``of``; other characters a path or a hive key
    cannot hold become ``-``)."""
    def safe(part: str) -> str:
        return re.sub(r"[^a-z0-9._-]+", "-", part.strip().strip('"').lower().replace("/", "of")).strip("-")

    alias = f"{safe(attack)}-{safe(param)}-{safe(text)}"
    if not ALIAS_PATTERN.fullmatch(alias) or not safe(text):
        raise ProducerError(f"sweep value {text!r} of {attack}.{param} makes no usable partition name ({alias!r})")
    return alias


def expand_sweeps(
    attacks: Sequence[str],
    attack_params: Mapping[str, Mapping[str, Any]] | None,
    attack_samples: Mapping[str, int] | None,
    sweeps: Sequence[Sweep],
) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, int], dict[str, dict[str, Any]]]:
    """`export`'s attacks, parameters, caps and ``sweeps`` with every sweep value added as an alias.

    A value's alias (`sweep_alias`) runs the swept attack with that attack's own ``--param`` values and the
    swept one replaced, under that attack's ``--max-samples`` cap. An attack that is only swept (not in
    `attacks`) lends its parameters to the sweep and is not run itself. Returns (attacks, attack_params,
    attack_samples, {alias: {"name", "attack", "param", "value"}}), the last for `export`'s ``sweeps``.
    """
    attacks = list(attacks)
    params = {k: dict(v) for k, v in (attack_params or {}).items()}
    caps = dict(attack_samples or {})
    specs = {s.name: s.attack for s in (AttackSpec.parse(a) for a in attacks)}
    entries: dict[str, dict[str, Any]] = {}
    lent: set[str] = set()
    for sweep in sweeps:
        if sweep.attack == CLEAN:
            raise ProducerError(f"--sweep {sweep.name}: '{CLEAN}' (the unattacked images) takes no parameters")
        if not sweep.values:
            raise ProducerError(f"--sweep {sweep.name} has no values; write e.g. {sweep.name}=2/255,4/255")
        values = [v for _, v in sweep.values]
        if len({json.dumps(v) for v in values}) < len(values):
            raise ProducerError(f"--sweep {sweep.name} repeats a value: {[t for t, _ in sweep.values]}")
        base = params.get(sweep.attack, {})
        if sweep.attack not in specs:
            lent.add(sweep.attack)
            if sweep.param in base:
                raise ProducerError(f"--param {sweep.name} is not used: --sweep {sweep.name} sets it (and "
                                    f"{sweep.attack} itself is not in --attacks)")
        for text, value in sweep.values:
            alias = sweep_alias(sweep.attack, sweep.param, text)
            attacks.append(f"{alias}={specs.get(sweep.attack, sweep.attack)}")
            params[alias] = {**{k: v for k, v in base.items() if k != sweep.param}, sweep.param: value}
            if sweep.attack in caps and alias not in caps:
                caps[alias] = caps[sweep.attack]
            entries[alias] = {"name": sweep.name, "attack": specs.get(sweep.attack, sweep.attack),
                              "param": sweep.param, "value": value}
    for name in lent:
        params.pop(name, None)
    return attacks, params, caps, entries


def _check_attack_params(spec: AttackSpec, params: dict[str, Any]) -> None:
    if spec.attack.startswith("art:"):
        return  # ARTAttack checks its names against the ART class when it is built
    where = spec.name if spec.name == spec.attack else f"{spec.name} ({spec.attack})"
    check_attack_params(spec.attack, params, where=f"attack {where}")


def check_attack_params(attack: str, params: Mapping[str, Any], *, where: str | None = None) -> None:
    """Refuse unknown parameter names (listing the accepted ones) and values out of range (`PARAM_RANGES`)
    for the registered attack `attack`, before any work."""
    cls = attack_class(attack)  # an unknown attack fails here, with the known names
    where = where or f"attack {attack}"
    unknown = sorted(set(params) - set(cls.param_names))
    if unknown:
        raise ProducerError(f"unknown parameter(s) {unknown} for {where}; accepted: {list(cls.param_names)}")
    defaults = _defaults(cls)
    for name, value in params.items():
        if value is None and defaults.get(name, 0) is None:
            continue  # "the attack's own rule" (e.g. alpha from eps and steps)
        problem = _out_of_range(name, value)
        if problem:
            raise ProducerError(f"{where}: {name} must be {problem}, got {value!r}")


def _defaults(cls: type) -> dict[str, Any]:
    """Keyword defaults along the class's __init__ chain (subclasses pass **kwargs to their base)."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            out.update({n: p.default for n, p in inspect.signature(init).parameters.items()
                        if p.default is not inspect.Parameter.empty})
    return out


def _out_of_range(name: str, value: Any) -> str | None:
    """What `value` must be when it is outside `name`'s range; None when it is fine (or not ranged)."""
    if name not in PARAM_RANGES:
        return None
    kind, low, inclusive, high = PARAM_RANGES[name]
    if kind == "boolean":
        return None if isinstance(value, bool) else "true or false"
    if "|" in kind:
        choices = kind.split("|")
        return None if value in choices else " or ".join(repr(c) for c in choices)
    integer = kind == "integer"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and math.isfinite(value) and (value >= low if inclusive else value > low)
    ok = ok and (high is None or value <= high)
    if ok:
        return None
    if integer:
        return "a positive integer" if low == 1 else f"an integer >= {low:g}"
    if high is not None:
        return f"a number in ({low:g}, {high:g}]"
    return "a number >= 0" if inclusive else "a positive number"


def check_sample_counts(samples: Mapping[str, int | None]) -> None:
    """Each split's sample count is a positive integer or None (all)."""
    for split, n in samples.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ProducerError(f"{split} samples must be a positive integer (or all), got {n!r}")


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count` disjoint slices of the selected samples (every count-th sample)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, spec: str) -> Shard:
        try:
            index, count = (int(p) for p in spec.split("/"))
        except ValueError:
            raise ProducerError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
        if not 0 <= index < count:
            raise ProducerError(f"--shard {spec}: need 0 <= I < N")
        return cls(index, count)

    @property
    def basename(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


@dataclass
class ExportReport:
    """What one export did: files written and skipped, and seconds and rows per (split, attack)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    staged: list[str] = field(default_factory=list)  # with commit=False: partitions left staged, for the caller


def select_samples(num_available: int, n: int | None, seed: int, split: str) -> np.ndarray:
    """The first `n` of a seeded permutation of the split (all when `n` is None), sorted.

    Every attack draws from this same list, so attacked rows always have clean partners; an attack with
    a smaller cap takes a prefix of the permutation.
    """
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(num_available)
    return order if n is None else order[: min(n, num_available)]


def export(
    model: ImageClassifier,
    data: Mapping[str, ImageSet],
    *,
    attacks: Sequence[str],
    out: str | Path,
    samples: Mapping[str, int | None],
    attack_samples: Mapping[str, int] | None = None,
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    noise: NoiseRecipe | None = None,
    features: bool = False,
    insen: bool = False,
    external: str | None = None,
    seed: int = 0,
    shard: Shard = Shard(),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    substitute: str | Path | None = None,
    commit: bool = True,
    sweeps: Mapping[str, Mapping[str, Any]] | None = None,
) -> ExportReport:
    """Attack each split of `data` with each of `attacks` and write one table partition per pair.

    Parameters
    ----------
    model : the target: maps images in [0, 1] to logits. Every exported column is this model's.
    data : ``{"train": ImageSet, "test": ImageSet}`` (either may be absent).
    attacks : attack names, ``clean`` meaning the unattacked images, or ``ALIAS=ATTACK`` items (e.g.
        ``["clean", "pgd", "pgd-eps8=pgd"]``): the partition is named after the alias.
    samples : per split, how many samples to select (None: all).
    attack_samples : per attack (alias), a smaller cap on samples per split (e.g. ``{"cw": 2000}``).
    attack_params : per attack (alias), parameters overriding the attack's defaults.
    noise : the noise recipe; None stores no ``noisy_logits``.
    features : also store penultimate-layer features.
    insen : also store the InSen statistics of each stored input (``insen``, `producers.models.insen.insen_stats`).
    external : ``gred:STEM``: also store a saved GRED's verdict on each stored input (``external_score``,
        ``external_label``; metadata key ``external``), `producers.models.gred.load_external`.
    metadata : extra table metadata (``dataset``, ``model``, …).
    substitute : path stem of a saved model (`producers.models.classifiers.save_model`). When given, every attack is
        computed through it and written as partition ``transfer-<alias>`` with threat model ``transfer``;
        ``clean`` is written as usual (the same rows as without a substitute).

    sweeps : per alias, the ``sweep`` entry its partition's ``attacks`` metadata records (``{"name": "pgd.eps",
        "attack": "pgd", "param": "eps", "value": 0.0078}``), as `expand_sweeps` returns it with the aliases.
    commit : False leaves this shard's partitions staged (``report.staged``, relative to its staging
        directory) for a caller that commits several shards in one step (`producers.export.scale`).

    Everything is checked before any attack runs: names, aliases, parameters, counts, and that tables
    already under `out` agree with the metadata this export would write.
    """
    out = Path(out)
    specs = plan_attacks(attacks, attack_params, attack_samples)
    sweeps = {k: dict(v) for k, v in (sweeps or {}).items()}
    unplanned = sorted(set(sweeps) - {s.name for s in specs if s.attack != CLEAN})
    if unplanned:
        raise ProducerError(f"sweep entries for attack(s) {unplanned} that are not being run")
    check_sample_counts(samples)
    if batch_size < 1:
        raise ProducerError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    model = model.to(device).eval()
    attack_samples = dict(attack_samples or {})
    attack_params = {k: dict(v) for k, v in (attack_params or {}).items()}
    class_names = next(iter(data.values())).class_names
    if model.config["num_classes"] != len(class_names):
        raise ProducerError(
            f"the model has {model.config['num_classes']} outputs but the dataset has {len(class_names)} classes"
        )
    attacker_model, substitute_meta = model, None
    if substitute is not None:
        attacker_model, substitute_meta = _load_substitute(substitute, next(iter(data.values())), device)
    external_system, external_meta = None, None
    if external is not None:
        from ..models.gred import load_external

        external_system, external_meta = load_external(external, model, device=device)
    # Build every attack up front so a bad name or parameter fails before hours of work.
    built = {s.name: make_attack(s.attack, attacker_model, batch_size=batch_size, device=device,
                                 **attack_params.get(s.name, {}))
             for s in specs if s.attack != CLEAN}
    base_meta = {
        **dict(metadata or {}),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "noise": None if noise is None else {**noise.to_metadata(), "seed": seed},
        "producer": {"name": "logitguard-produce", "version": __version__},
        "seed": seed,
        **({} if external_meta is None else {"external": external_meta}),
    }
    partitions = []  # (partition name, spec, per-partition metadata)
    for spec in specs:
        if spec.attack == CLEAN:
            partitions.append((CLEAN, spec, {"attacks": {}}))
            continue
        name = spec.name if substitute_meta is None else TRANSFER_PREFIX + spec.name
        params = built[spec.name].params()
        threat = {"model": "oblivious" if substitute_meta is None else "transfer", "attack": spec.attack,
                  "eps": params.get("eps")}
        if substitute_meta is not None:
            threat["substitute"] = substitute_meta
        entry = params if name == spec.attack else {**params, "attack": spec.attack}
        if spec.name in sweeps:
            entry = {**entry, "attack": spec.attack, "sweep": sweeps[spec.name]}
        partitions.append((name, spec, {
            "attacks": {name: entry},
            "threat": {name: threat},
        }))
    existing = {n: m for n, _, m in partitions}
    _check_existing(out, base_meta, existing)
    plan = []  # (split, partition name, attack spec, metadata, rows)
    for split, dataset in data.items():
        selected = select_samples(len(dataset), samples.get(split), seed, split)
        for name, spec, partition_meta in partitions:
            rows = np.sort(selected[:attack_samples.get(spec.name)][shard.index::shard.count])
            plan.append((split, name, spec, {**base_meta, **partition_meta}, rows))
    report = ExportReport()
    with ExportStage(out, shard.basename) as stage:
        todo = []
        for split, name, spec, meta, rows in plan:
            rel = f"split={split}/attack={name}/{shard.basename}.parquet"
            state = stage.classify(rel, meta, name, rows, features=features, insen=insen,
                                   external=external is not None)
            if state == "done":
                report.skipped.append(out / rel)
            elif state == "todo":
                todo.append((rel, split, name, spec, meta, rows))
        for rel, split, name, spec, meta, rows in todo:
            started = time.perf_counter()
            table = export_partition(
                model, data[split], rows, attack=name, attacker=built.get(spec.name), noise=noise,
                features=features, generator_seed=[seed, zlib.crc32(f"{split}/{name}".encode()), shard.index],
                insen=insen, external=external_system,
                batch_size=batch_size, device=device, metadata=meta, progress=progress,
            )
            stage.write(rel, table)
            seconds = time.perf_counter() - started
            report.timings.append({"split": split, "attack": name, "rows": len(rows), "seconds": seconds})
        if not commit:
            report.staged = list(stage.files)
            return report
        report.written = stage.commit(check=lambda: _check_existing(out, base_meta, existing))
    return report


class ExportStage:
    """The partitions of one export run, staged beside `out` and added to it together at the end.

    Staging is ``.<out>.resume-<key>`` (`logitguard.files.StagedDirectory`): a run that fails or is killed
    leaves `out` as it was and its finished partitions there; a rerun with the same key resumes from
    them, but only from partitions written with the same metadata (parameters, model, noise, …) and the
    same samples; anything else is redone. Two runs with the same key cannot stage at once. `commit`
    puts every staged partition of this run into `out` in one step (`out` holds either none or all).
    """

    def __init__(self, out: str | Path, key: str) -> None:
        self.out = Path(out)
        self.stage = StagedDirectory(self.out, resume_key=key, error=ProducerError)
        self.files: list[str] = []

    def classify(self, rel: str, metadata: dict[str, Any], name: str, rows: np.ndarray, *,
                 features: bool | None = None, insen: bool | None = None, external: bool | None = None) -> str:
        """``done``: `out` holds the partition (raises when it was made differently); ``staged``: an
        interrupted run staged it with the same settings; ``todo``: it must be (re)computed."""
        final = self.out / rel
        if final.exists():
            problem = partition_mismatch(final, metadata, name, rows, features=features, insen=insen,
                                         external=external, strict=False)
            if problem:
                raise ProducerError(f"{final} already exists and {problem}; use another --out (or alias)")
            return "done"
        staged = self.stage.path / rel
        if staged.exists():
            if partition_mismatch(staged, metadata, name, rows, features=features, insen=insen,
                                  external=external) is None:
                self.files.append(rel)
                return "staged"
            staged.unlink()  # an interrupted run with other settings: redo it
        return "todo"

    def write(self, rel: str, table: LogitTable) -> None:
        write_table(table, self.stage.path / rel, overwrite=True)
        self.files.append(rel)

    def commit(self, check=None) -> list[Path]:
        """Add every staged partition to `out` at once (after `check()`, under `out`'s lock)."""
        if not self.files:
            self.stage.discard()
            return []
        return self.stage.commit(self.files, check=check)

    def __enter__(self) -> ExportStage:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.stage.path.exists() and not any(p.is_file() for p in self.stage.path.rglob("*.parquet")):
            self.stage.discard()  # nothing to resume from
        else:
            self.stage.close()  # keeps what was staged, for a rerun


def partition_mismatch(file: Path, metadata: dict[str, Any], name: str, rows: np.ndarray, *,
                       features: bool | None = None, insen: bool | None = None, external: bool | None = None,
                       strict: bool = True) -> str | None:
    """How the partition file `file` differs from what an export would write there, or None.

    Compared: the table metadata this export writes (``attacks`` and ``threat`` by the partition `name`),
    the sample ids (`rows`) and, when given, whether it has ``features``, ``insen`` and the ``external_*``
    columns. Without `strict`, a key the file
    lacks is not a difference (files from earlier versions).
    """
    try:
        parquet = pq.ParquetFile(file, page_checksum_verification=True)
        theirs = json.loads((parquet.schema_arrow.metadata or {}).get(METADATA_KEY) or b"{}")
        ids = parquet.read(columns=["sample_id"]).column("sample_id").to_numpy()
        names = parquet.schema_arrow.names
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        return f"cannot be read ({exc})"
    for key, value in json.loads(json.dumps(metadata)).items():
        old = theirs.get(key)
        if key in ("attacks", "threat"):
            value, old = (value or {}).get(name), (old or {}).get(name)
        if key == "threat" and isinstance(old, dict):  # what only running the attack tells (the suite's record)
            old = {k: v for k, v in old.items() if k not in ("broken_by", "indicators")}
        if (old is not None or strict) and old != value:
            return f"was written with {key} {old!r}; this export would write {value!r}"
    for wanted, column, what in ((features, "features", "features"), (insen, "insen", "insen statistics"),
                                 (external, "external_score", "an external system's columns")):
        if wanted is not None and (column in names) != wanted:
            return f"was written {'with' if column in names else 'without'} {what}"
    if not np.array_equal(np.sort(ids), np.sort(rows)):
        return f"holds {len(ids)} rows of other samples than the {len(rows)} this export selects " \
               "(another --seed, sample count or --max-samples)"
    return None


def _load_substitute(stem: str | Path, data: ImageSet, device: torch.device) -> tuple[ImageClassifier, dict]:
    """The attacker's substitute model and its description for the ``threat`` metadata."""
    stem = Path(stem)
    substitute = load_model(stem, device=device)
    config = substitute.config
    if config.get("num_classes") != data.num_classes:
        raise ProducerError(f"substitute {stem} has {config.get('num_classes')} outputs but the dataset has "
                            f"{data.num_classes} classes")
    if "image_size" in config and [config.get("in_channels"), *config["image_size"]] != list(data.image_shape):
        raise ProducerError(f"substitute {stem} takes images of shape "
                            f"{[config.get('in_channels'), *config['image_size']]}, the dataset has "
                            f"{list(data.image_shape)}")
    meta = {"spec": str(stem), "sha256": file_sha256(stem.with_suffix(".pt")),
            "test_accuracy": config.get("test_accuracy"), "arch": config.get("arch")}
    if "width" in config:
        meta["width"] = config["width"]
    if isinstance(config.get("train"), dict) and "seed" in config["train"]:
        meta["seed"] = config["train"]["seed"]
    return substitute, meta


def _check_existing(out: Path, base_meta: dict[str, Any], partitions: dict[str, dict[str, Any]]) -> None:
    """Refuse to add to a table under `out` whose files would disagree with what this export writes.

    Partitions already there are skipped (resume), so the check is on metadata: every shared key must be
    equal (the reader refuses a table whose files disagree), and an attack already there must have been
    run with the same parameters and threat model.
    """
    if not out.is_dir():
        return
    mine = json.loads(json.dumps(base_meta))  # as it will read back
    for file in sorted(out.glob("split=*/attack=*/*.parquet")):
        try:
            raw = (pq.read_schema(file).metadata or {}).get(METADATA_KEY)
            theirs = json.loads(raw) if raw else {}
        except (OSError, ValueError) as exc:
            raise ProducerError(f"{out} holds an unreadable table file {file}: {exc}") from None
        for key, value in mine.items():
            if key in theirs and theirs[key] != value:
                raise ProducerError(f"{out} already holds a table with a different {key!r} ({file} has "
                                    f"{theirs[key]!r}, this export would write {value!r}); use another --out")
        for name, meta in partitions.items():
            for key in ("attacks", "threat"):
                new, old = json.loads(json.dumps(meta.get(key, {}).get(name))), theirs.get(key, {}).get(name)
                if new is not None and old is not None and new != old:
                    raise ProducerError(f"{out} already holds attack {name!r} with {key} {old!r} ({file}); this "
                                        f"export would write {new!r}; use another alias or --out")


def export_partition(
    model: ImageClassifier,
    data: ImageSet,
    rows: np.ndarray,
    *,
    attack: str,
    attacker,
    noise: NoiseRecipe | None,
    features: bool,
    generator_seed: list[int],
    insen: bool = False,
    external=None,
    batch_size: int,
    device: torch.device,
    metadata: dict[str, Any],
    progress: bool,
) -> LogitTable:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence(generator_seed).generate_state(1)[0]))
    # The external system's own draws (GRED's masks), so adding it changes no other column.
    external_generator = torch.Generator(device=device)
    external_generator.manual_seed(int(np.random.SeedSequence([*generator_seed, 1]).generate_state(1)[0]))
    columns: dict[str, list[np.ndarray]] = {}
    chunk = max(batch_size, 1024)  # images loaded at a time; the attack batches within a chunk
    bar = tqdm(total=len(rows), desc=f"{data.split}/{attack}", unit="img", disable=not progress)
    for start in range(0, len(rows), chunk):
        idx = rows[start:start + chunk]
        x = data.load(idx)
        y = torch.as_tensor(data.labels[idx])
        if attacker is None:
            x_adv = x
            bar.update(len(idx))
        else:
            x_adv = attacker(x, y, generator=generator, on_batch=bar.update)
        with torch.no_grad():
            logits = _batched(model, x_adv, batch_size, device)
            clean_pred = logits.argmax(1) if attacker is None else _batched(model, x, batch_size, device).argmax(1)
        pred = logits.argmax(1)
        delta = (x_adv - x).flatten(1)
        part = {
            "sample_id": idx.astype(np.int64),
            "label": data.labels[idx],
            "logits": logits.numpy(),
            "pred": pred.numpy(),
            "linf": delta.abs().amax(1).numpy(),
            "l2": delta.norm(dim=1).numpy(),
        }
        # Recomputed, never the attack's own flag; always False on clean rows.
        part["success"] = successful_attack(clean_pred.numpy(), pred.numpy(), y.numpy())
        if noise is not None:
            part["noisy_logits"] = noise_queries(model, x_adv, noise, generator=generator,
                                                 batch_size=8 * batch_size, device=device).numpy()
        if features:
            with torch.no_grad():
                feats = _batched(model.penultimate, x_adv, batch_size, device)
            part["features"] = feats.numpy()
        if insen:  # of the stored (attacked) input, as the model sees it
            part["insen"] = torch.cat([insen_stats(model, x_adv[i:i + batch_size].to(device)).float().cpu()
                                       for i in range(0, len(x_adv), batch_size)]).numpy()
        if external is not None:
            part["external_score"], part["external_label"] = external.verdict(
                x_adv, generator=external_generator, batch_size=batch_size, device=device)
        for name, values in part.items():
            columns.setdefault(name, []).append(values)
    bar.close()
    arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
    return LogitTable.from_arrays(split=data.split, attack=attack, metadata=metadata, **arrays)


def _batched(fn, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])
