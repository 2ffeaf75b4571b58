"""Detectors that read a table column besides the logits (kdensity: penultimate features; insen: InSen
statistics), their mirrors, and the adaptive attacks through them.

One small world: a one-hidden-layer ReLU MLP trained full-batch on the 8x8 digits (a second or two), its
features / InSen statistics / logits on clean and PGD images. The kdensity detector learns from the
train split's clean features (as the paper does); the insen detector from the first half of the test
split (clean vs PGD) and is judged on the second half.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F

from logitguard import LogitguardError, TableSource, read_table, write_table
from logitguard.cli import main
from logitguard.defenses.gated import GatedDefense
from logitguard.defenses.detectors import InsenDetector, KDensityDetector, load_detector, make_detector
from logitguard.defenses.detectors.kdensity import PAPER_SIGMA2
from logitguard.evaluation.guard import fit_guard
from producers.attacks import make_attack
from producers.models.insen import insen_stats
from producers.models.classifiers import ImageClassifier
from producers.threat.mirrors import InsenMirror, KDensityMirror, mirror_detector
from producers.threat.pipeline import PipelineMirror

EPS = 0.1  # PGD misclassifies about 64% of the test digits (0.2: 90%, but then InSen separates less)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny full-batch models run fastest on one thread; on a shared, loaded CPU more threads cost 50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyMLP(nn.Module):
    """64 → 32 (ReLU) → 10; `head` is the final linear layer `ImageClassifier.penultimate` hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _columns(model: ImageClassifier, x: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        logits, feats = model(x), model.penultimate(x)
    return {"logits": logits.double().numpy(), "features": feats.double().numpy(),
            "insen": insen_stats(model, x).double().numpy()}


@pytest.fixture(scope="module")
def world(digits_sets):
    train, test = digits_sets
    torch.manual_seed(0)
    model = ImageClassifier(TinyMLP(), [0.0], [1.0], {"arch": "tiny-mlp"})
    x_train, y_train = train.load(np.arange(len(train.labels))), torch.as_tensor(train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    model.eval()
    x_test, y_test = test.load(np.arange(len(test.labels))), torch.as_tensor(test.labels)
    pgd = make_attack("pgd", model, eps=EPS, alpha=EPS / 4, steps=10)(x_test, y_test,
                                                                  generator=torch.Generator().manual_seed(0))
    clean, attacked = _columns(model, x_test), _columns(model, pgd)
    success = (clean["logits"].argmax(1) == test.labels) & (attacked["logits"].argmax(1) != test.labels)
    fit = _columns(model, x_train)  # the paper's K-density uses the training points, at its default bandwidth
    kdensity = KDensityDetector().fit(fit["logits"], labels=train.labels, features=fit["features"])
    return {"model": model, "x": x_test, "y": y_test, "clean": clean, "pgd": attacked, "success": success,
            "kdensity": kdensity}


def _auroc(clean: np.ndarray, attacked: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(attacked))], np.r_[clean, attacked])


# -- the core detectors ----------------------------------------------------------------------------


def test_kdensity_scores_follow_the_formula_and_subsample_per_class():
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(60, 3)), np.repeat([0, 1, 2], 20)
    logits = np.eye(4)[labels] * 5 + rng.normal(size=(60, 4))  # class 3 is never seen clean
    detector = KDensityDetector(sigma2=2.0, max_per_class=7, seed=1).fit(logits, labels=labels, features=feats)
    assert np.bincount(detector.train_labels_).tolist() == [7, 7, 7] and detector.class_counts_.tolist() == [7, 7, 7, 0]
    again = KDensityDetector(sigma2=2.0, max_per_class=7, seed=1).fit(logits, labels=labels, features=feats)
    np.testing.assert_array_equal(again.train_features_, detector.train_features_)  # seeded
    assert not np.array_equal(KDensityDetector(sigma2=2.0, max_per_class=7, seed=2).fit(
        logits, labels=labels, features=feats).train_features_, detector.train_features_)
    query, predicted = rng.normal(size=(5, 3)) * 3, np.array([0, 1, 2, 3, 1])
    expected = []
    for f, y in zip(query, predicted):  # the paper's formula, row by row
        train = detector.train_features_ if y == 3 else detector.train_features_[detector.train_labels_ == y]
        expected.append(-np.log(np.mean(np.exp(-((train - f) ** 2).sum(axis=1) / 2.0))))
    got = detector.score_samples(np.eye(4)[predicted], features=query)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # Far from every training row the kernel underflows; the log-sum-exp keeps the score finite.
    far = detector.score_samples(np.eye(4)[[0]], features=np.full((1, 3), 1e3))
    assert np.isfinite(far).all() and far[0] > 1e5
    assert KDensityDetector().sigma2 == PAPER_SIGMA2 == 1 / 0.26


def test_kdensity_needs_labels_and_refuses_bad_parameters():
    with pytest.raises(LogitguardError, match="pass labels="):
        KDensityDetector().fit(np.eye(3), features=np.eye(3))
    for params, message in (({"sigma2": 0}, "sigma2 must be a positive number"),
                            ({"max_per_class": 0}, "max_per_class must be an integer >= 1")):
        with pytest.raises(LogitguardError, match=message):
            make_detector("kdensity", **params)


def test_kdensity_separates_pgd_from_clean_and_round_trips(world, tmp_path):
    detector, clean, pgd, ok = world["kdensity"], world["clean"], world["pgd"], world["success"]
    assert ok.sum() > 150
    scores = {name: detector.score_samples(rows["logits"], features=rows["features"])
              for name, rows in (("clean", clean), ("pgd", pgd))}
    assert _auroc(scores["clean"][ok], scores["pgd"][ok]) > 0.8
    loaded = load_detector(detector.save(tmp_path / "kd.npz"))
    assert isinstance(loaded, KDensityDetector) and loaded.n_features_ == 32
    np.testing.assert_array_equal(loaded.score_samples(pgd["logits"], features=pgd["features"]), scores["pgd"])
    assert loaded.threshold_ == detector.threshold_


def test_insen_detector_learns_from_successful_attacks(world, tmp_path):
    clean, pgd, ok = world["clean"], world["pgd"], world["success"]
    half = np.arange(len(ok)) < len(ok) // 2
    fit_rows = half & ok
    detector = InsenDetector().fit(np.r_[clean["logits"][half], pgd["logits"][fit_rows]],
                                   np.r_[np.zeros(half.sum(), bool), np.ones(fit_rows.sum(), bool)],
                                   features=np.r_[clean["insen"][half], pgd["insen"][fit_rows]],
                                   groups=np.r_[np.flatnonzero(half), np.flatnonzero(fit_rows)])
    later = ~half & ok
    clean_scores = detector.score_samples(clean["logits"][later], features=clean["insen"][later])
    pgd_scores = detector.score_samples(pgd["logits"][later], features=pgd["insen"][later])
    assert _auroc(clean_scores, pgd_scores) > 0.75
    manual = (pgd["insen"][later] - detector.center_) / detector.scale_ @ detector.coef_ + detector.intercept_[0]
    np.testing.assert_allclose(pgd_scores, manual)
    loaded = load_detector(detector.save(tmp_path / "insen.npz"))
    np.testing.assert_array_equal(loaded.score_samples(pgd["logits"][later], features=pgd["insen"][later]), pgd_scores)
    with pytest.raises(LogitguardError, match="needs both"):
        InsenDetector().fit(clean["logits"], features=clean["insen"])


@pytest.mark.parametrize("kind", ["kdensity", "insen"])
def test_fit_path_reads_the_column_and_equals_fit_table(kind, digits_feature_table, digits_split_dir, tmp_path):
    path = tmp_path / "table.parquet"
    write_table(digits_feature_table, path)
    train = TableSource(path, split="train")
    fitted = make_detector(kind).fit_table(read_table(train), attacks=["fgsm"])
    streamed = make_detector(kind).fit_path(train, attacks=["fgsm"])
    np.testing.assert_array_equal(streamed.calibration_scores_, fitted.calibration_scores_)
    for name, value in fitted._learned().items():
        np.testing.assert_array_equal(streamed._learned()[name], value, err_msg=name)
    with pytest.raises(LogitguardError, match=f"reads the table column '{make_detector(kind).input_column}'"):
        make_detector(kind).fit_path(TableSource(digits_split_dir, split="train"))


def test_detect_streams_the_column(digits_feature_table, tmp_path):
    from logitguard.engines.stream import detect_path

    path = tmp_path / "table.parquet"
    write_table(digits_feature_table, path)
    detector = make_detector("kdensity").fit_table(digits_feature_table.select(split="train"))
    report = detect_path(detector, TableSource(path, split="test"), batch_rows=100)
    test = digits_feature_table.select(split="test")
    flags = detector.flag_table(test)
    assert report["flagged_rate"] == {a: float(flags[test.attack == a].mean()) for a in test.attacks}


def test_deployable_defenses_refuse_feature_detectors(digits_feature_table):
    detector = make_detector("kdensity").fit_table(digits_feature_table.select(split="train"))
    with pytest.raises(LogitguardError, match="a gated defense decides from logits .* reads the 'features' column"):
        GatedDefense(detector, None, on_flag="reject")
    with pytest.raises(LogitguardError, match="a guard sees only the logits a remote model returns; the 'insen'"):
        fit_guard(digits_feature_table, detector="insen", on_flag="reject", attacks=["fgsm"])


def test_cli_fits_a_kdensity_detector(digits_feature_table, digits_split_dir, tmp_path):
    path = tmp_path / "table.parquet"
    write_table(digits_feature_table, path)
    out = tmp_path / "kd.npz"
    runner = CliRunner()
    result = runner.invoke(main, ["fit-detector", str(path), "--kind", "kdensity", "--sigma2", "5", "--max-per-class",
                                  "20", "--split", "test", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["params"]["sigma2"] == 5.0 and report["params"]["max_per_class"] == 20
    assert len(load_detector(out).train_labels_) <= 200
    result = runner.invoke(main, ["fit-detector", str(digits_split_dir), "--kind", "kdensity",
                                  "--out", str(tmp_path / "no.npz")])
    assert result.exit_code != 0 and "Error: the 'kdensity' detector reads the table column 'features'" in result.output


# -- mirrors and adaptive attacks ------------------------------------------------------------------


def test_mirrors_equal_the_core(world):
    detector, pgd = world["kdensity"], world["pgd"]
    mirror = mirror_detector(detector)
    assert isinstance(mirror, KDensityMirror) and mirror.input_column == "features"
    logits, feats = torch.from_numpy(pgd["logits"]), torch.from_numpy(pgd["features"])
    core = detector.score_samples(pgd["logits"], features=pgd["features"])
    np.testing.assert_allclose(mirror(logits, None, feats).numpy(), core, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(mirror.flags(logits, None, feats).numpy(), core > detector.threshold_)
    with pytest.raises(Exception, match=re.escape("reads the 'features' column")):
        mirror(logits)
    clean = world["clean"]
    insen = InsenDetector().fit(np.r_[clean["logits"], pgd["logits"]], np.r_[np.zeros(len(clean["logits"]), bool),
                                world["success"]], features=np.r_[clean["insen"], pgd["insen"]])
    insen_mirror = mirror_detector(insen)
    assert isinstance(insen_mirror, InsenMirror)
    np.testing.assert_allclose(insen_mirror(logits, None, torch.from_numpy(pgd["insen"])).numpy(),
                               insen.score_samples(pgd["logits"], features=pgd["insen"]), rtol=1e-9, atol=1e-9)


def test_insen_mirror_is_differentiable_in_the_image_by_double_backprop(world):
    """The score's gradient with respect to x passes through an input gradient (insen_stats with
    create_graph=True); it is non-zero and matches a central finite difference (the model in float64; the
    summary itself computes in float32, hence the step and the tolerance)."""
    clean, pgd = world["clean"], world["pgd"]
    insen = InsenDetector().fit(np.r_[clean["logits"], pgd["logits"]], np.r_[np.zeros(len(clean["logits"]), bool),
                                world["success"]], features=np.r_[clean["insen"], pgd["insen"]])
    mirror = mirror_detector(insen)
    model = ImageClassifier(TinyMLP(), [0.0], [1.0], {}).double()
    model.load_state_dict(world["model"].state_dict())
    x = world["x"][:8].double().requires_grad_(True)

    def score(images: torch.Tensor) -> torch.Tensor:
        return mirror(model(images), None, insen_stats(model, images, create_graph=True)).sum()

    (grad,) = torch.autograd.grad(score(x), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        numeric = (score(x + h * direction) - score(x - h * direction)) / (2 * h)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-2)


def test_adaptive_evade_through_kdensity_hides_from_the_detector(world):
    """Pang's C&W-wb against K-density, in L-inf hinge form (`evade`): at the same budget as the oblivious
    PGD, the rows it misclassifies are flagged far less often."""
    model, detector = world["model"], world["kdensity"]
    x, y = world["x"][:120], world["y"][:120]
    defense = PipelineMirror(mirror_detector(detector), None, on_flag="reject")
    assert defense.input_column == "features"
    attack = make_attack("evade", model, defense=defense, eps=EPS, steps=20, restarts=1)
    adv = attack(x, y, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= EPS + 1e-6
    rows = _columns(model, adv)
    wrong = rows["logits"].argmax(1) != y.numpy()
    flagged = detector.flag(rows["logits"], features=rows["features"])
    pgd, pgd_wrong = world["pgd"], world["pgd"]["logits"][:120].argmax(1) != y.numpy()
    pgd_flagged = detector.flag(pgd["logits"][:120], features=pgd["features"][:120])
    assert wrong.sum() >= 30 and pgd_wrong.sum() >= 30
    oblivious, adaptive = pgd_flagged[pgd_wrong].mean(), flagged[wrong].mean()
    assert adaptive < oblivious - 0.3, (adaptive, oblivious)


def test_adaptive_evade_through_insen_runs_on_double_backprop(world):
    """The same route against the insen detector: every step differentiates the InSen statistics (an input
    gradient) again. The rows it misclassifies pass the core detector, fed the producer's statistics."""
    model, clean, pgd = world["model"], world["clean"], world["pgd"]
    detector = InsenDetector().fit(np.r_[clean["logits"], pgd["logits"]], np.r_[np.zeros(len(clean["logits"]), bool),
                                   world["success"]], features=np.r_[clean["insen"], pgd["insen"]])
    x, y = world["x"][:60], world["y"][:60]
    defense = PipelineMirror(mirror_detector(detector), None, on_flag="reject")
    adv = make_attack("evade", model, defense=defense, eps=EPS, steps=10, restarts=1)(
        x, y, generator=torch.Generator().manual_seed(0))
    rows = _columns(model, adv)
    wrong = rows["logits"].argmax(1) != y.numpy()
    assert wrong.mean() > 0.3
    assert not detector.flag(rows["logits"], features=rows["insen"])[wrong].any()
