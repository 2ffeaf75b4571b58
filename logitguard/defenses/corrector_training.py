"""Training the logit corrector: the shared epoch loop and the two ways of building its mini-batches.

`LogitCorrector.fit` and `LogitCorrector.fit_table` validate their inputs and call these functions:

- in memory (`fit` on arrays, or `fit_table` on a table), `paired_batches`: clean and attacked rows of the
  same sample are paired, and each pair shows exactly one of the two per epoch, as in Algorithm 1;
- streamed (`fit_table(path, stream=True)`), `fit_stream`: mini-batches are drawn from the Parquet files
  without loading them, for tables larger than memory. Rows are kept independently (clean rows with a
  probability chosen so that the expected clean share is ``p_clean`` and an epoch has as many rows as
  there are attacked rows) and shuffled through a buffer (`shuffled_batches`); the clean and attacked rows
  of one sample are not coupled, which is the only difference from the in-memory mix. The validation
  pairs are read in one pass first (`stream_validation`).

`train` runs Adam on cross-entropy over either source; with validation it keeps the best epoch
(`validation_scores`) and stops early.

Torch is imported on first use (a `LogitguardError` says how to get it), so importing this module is cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LogitguardError
from ..tables import CLEAN, TableSource, holdout_mask, iter_batches, read_keys, stream_batch_rows

if TYPE_CHECKING:
    import torch

    from .corrector import LogitCorrector

    Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
    Validation = tuple[np.ndarray, np.ndarray, np.ndarray]


def fit_stream(corrector: LogitCorrector, source: TableSource, attacks: list[str], counts: dict[str, int],
               buffer_rows: int) -> LogitCorrector:
    """Train `corrector` on the rows of `source` (of one split), streamed through a shuffle buffer."""
    n_attacked = sum(counts[name] for name in attacks)
    # Keep probabilities: the expected clean share is p_clean, an epoch has ~n_attacked rows.
    keep = {name: 1.0 - corrector.p_clean for name in attacks}
    keep[CLEAN] = corrector.p_clean * n_attacked / counts[CLEAN]
    if keep[CLEAN] > 1.0:  # too few clean rows for the share: keep them all, thin the attacked rows
        keep = {name: keep[name] / keep[CLEAN] for name in keep}
    validation, num_classes, class_names = stream_validation(corrector, source, attacks)
    corrector._start(num_classes, class_names, attacks)
    # Reader batches of ~8 MiB (`stream_batch_rows`) and one preallocated float32 shuffle buffer filled in
    # place: no concatenated copy of the buffer, which keeps `train-corrector --stream` under 2 GiB.
    batch_rows = stream_batch_rows(source)

    def batches(rng: np.random.Generator) -> Batches:
        streams = {name: iter_batches(source, attacks=name, batch_rows=batch_rows) for name in keep}
        remaining = {name: float(counts[name]) for name in keep}
        x = np.empty((buffer_rows + batch_rows, num_classes), dtype=np.float32)
        y = np.empty(buffer_rows + batch_rows, dtype=np.int64)
        size = 0
        while streams:
            names = list(streams)
            weights = np.array([remaining[n] for n in names]) + 1e-9
            name = names[rng.choice(len(names), p=weights / weights.sum())]
            chunk = next(streams[name], None)
            if chunk is None:
                del streams[name]
                continue
            remaining[name] -= len(chunk)
            rows = (rng.random(len(chunk)) < keep[name])
            rows &= ~holdout_mask(chunk.sample_id, corrector.validation_fraction, corrector.seed)
            taken = int(rows.sum())
            np.compress(rows, chunk.logits, axis=0, out=x[size:size + taken])
            y[size:size + taken] = chunk.labels[rows]
            size += taken
            if size >= buffer_rows:
                size = yield from shuffled_batches(x, y, size, rng, batch_size=corrector.batch_size, drain=False)
        yield from shuffled_batches(x, y, size, rng, batch_size=corrector.batch_size, drain=True)

    return train(corrector, batches, validation)


def stream_validation(corrector: LogitCorrector, source: TableSource, attacks: list[str],
                      ) -> tuple[Validation | None, int, list[str]]:
    """The held-out validation pairs, C and the class names, in one pass over the logits.

    The pairs' places are known before any logit is read (from the key columns: the held-out samples with a
    clean and an attacked row, per attack), so each held-out row is copied once, straight into its place in
    the preallocated (P, C) float32 arrays: the validation set costs its own size in memory, not a multiple."""
    frac, seed = corrector.validation_fraction, corrector.seed
    places: dict[str, np.ndarray] = {}  # attack -> the sorted sample ids of its pairs
    if frac:
        keys = read_keys(source, attacks=[CLEAN, *attacks])
        held = holdout_mask(keys.sample_id, frac, seed)
        clean_ids = keys.sample_id[held & (keys.attack == CLEAN)]
        places = {name: np.intersect1d(clean_ids, keys.sample_id[held & (keys.attack == name)]) for name in attacks}
    offsets = np.cumsum([0, *(len(ids) for ids in places.values())])
    total = int(offsets[-1])
    if frac and not total:
        raise LogitguardError("validation_fraction holds out no sample; raise it or add data")
    clean = attacked = labels = None
    table = None
    for table in iter_batches(source, attacks=[CLEAN, *attacks], batch_rows=stream_batch_rows(source)):
        if not total:
            continue
        if clean is None:
            clean = np.empty((total, table.num_classes), dtype=np.float32)
            attacked = np.empty_like(clean)
            labels = np.empty(total, dtype=np.int64)
        held = holdout_mask(table.sample_id, frac, seed)
        for offset, (name, ids) in zip(offsets, places.items()):
            for source, into in ((CLEAN, clean), (name, attacked)):
                rows = np.flatnonzero(held & (table.attack == source))
                at = np.searchsorted(ids, table.sample_id[rows])
                hit = at < len(ids)
                hit[hit] = ids[at[hit]] == table.sample_id[rows[hit]]
                into[offset + at[hit]] = table.logits[rows[hit]]
                if source == CLEAN:
                    labels[offset + at[hit]] = table.labels[rows[hit]]
    if table is None:
        raise LogitguardError(f"{source}: no rows")
    if not total:
        return None, table.num_classes, table.class_names
    return (clean, attacked, labels), table.num_classes, table.class_names


def train(corrector: LogitCorrector, epoch_batches: Callable[[np.random.Generator], Batches],
          validation: Validation | None) -> LogitCorrector:
    """The shared loop: Adam on cross-entropy; with validation keep the best epoch and stop early."""
    from tqdm.auto import tqdm

    from .corrector import _torch

    torch = _torch("training a corrector")
    from torch.nn import functional as F

    from ._corrector_net import build_mlp

    rng = np.random.default_rng(corrector.seed)
    device = corrector.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(corrector.seed)
        model = build_mlp(corrector.n_classes_, int(corrector.hidden), corrector.dropout).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=corrector.lr, weight_decay=corrector.weight_decay)
        corrector.history_ = []
        best_score, best_state, corrector.best_epoch_, stale = -np.inf, None, corrector.epochs, 0
        bar = tqdm(range(1, corrector.epochs + 1), desc="corrector", unit="epoch", disable=not corrector.progress,
                   leave=False)
        for epoch in bar:
            model.train()
            total, count = 0.0, 0
            for x, y in epoch_batches(rng):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
            if count == 0:
                raise LogitguardError("an epoch drew no training rows; add data or lower validation_fraction")
            record = {"epoch": epoch, "loss": total / count}
            if validation is not None:
                corrector.model_ = model.eval()
                record.update(validation_scores(corrector, *validation))
                if record["val_score"] > best_score:
                    best_score, corrector.best_epoch_, stale = record["val_score"], epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
            corrector.history_.append(record)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch"})
            if stale >= corrector.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
    corrector.model_ = model.eval()
    return corrector


def validation_scores(corrector: LogitCorrector, clean: np.ndarray, attacked: np.ndarray,
                      labels: np.ndarray) -> dict[str, float]:
    """Clean and robust accuracy of `corrector` on held-out pairs, and their p_clean-weighted mean."""
    clean_acc = float((corrector.predict(clean) == labels).mean())
    robust_acc = float((corrector.predict(attacked) == labels).mean())
    score = corrector.p_clean * clean_acc + (1 - corrector.p_clean) * robust_acc
    return {"val_clean_accuracy": clean_acc, "val_robust_accuracy": robust_acc, "val_score": score}


def paired_batches(clean: np.ndarray, attacked: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                   p_clean: float, batch_size: int) -> Batches:
    """Algorithm 1: a random permutation; each sample shows clean logits with probability p_clean."""
    import torch

    clean_t, attacked_t = torch.from_numpy(clean), torch.from_numpy(attacked)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    order = torch.from_numpy(rng.permutation(len(labels)))
    use_clean = torch.from_numpy(rng.random(len(labels)) < p_clean)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield torch.where(use_clean[idx, None], clean_t[idx], attacked_t[idx]), labels_t[idx]


def shuffled_batches(x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator, *, batch_size: int,
                     drain: bool) -> Generator[tuple[Any, Any], None, int]:
    """Shuffle the first `size` rows of the buffer (x (B, C) float32, y (B,) int64) and emit full mini-batches;
    unless `drain`, move the remainder to the front. Returns the rows left in the buffer."""
    if not size:
        return 0
    import torch

    order = rng.permutation(size)
    cut = size if drain else size - size % batch_size
    for start in range(0, cut, batch_size):
        idx = order[start:start + batch_size]
        yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
    rest = order[cut:]
    x[:len(rest)], y[:len(rest)] = x[rest], y[rest]
    return len(rest)
