"""The head on real embeddings (the default int8 model on clothing-small) and `edge.evaluate`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edge.engine import load_reference, load_spread
from edge.evaluate import Split, embed_bursts, load_dataset, load_unknown, run_trials
from edge.head import Head, gate_features, l2_normalize
from edge.image import list_images
from head_reference import SvdHead


@pytest.fixture(scope="module")
def clothing_split(clothing, engine):
    """(train, test) embeddings of clothing-small, embedded once for this module."""
    return load_dataset(clothing, engine.embed)


@pytest.fixture(scope="module")
def mean(engine):
    return load_reference(engine.path, engine.dim)


@pytest.fixture(scope="module")
def spread(engine):
    """The shipped spread prior: the box's head uses it, so the accuracy targets do too."""
    rows = load_spread(engine.path, engine.dim)
    assert rows is not None, "models/ ships a spread prior beside the default model"
    return rows


@pytest.mark.parametrize("kind", ["centroid", "knn"])
def test_gram_refit_decides_like_the_svd_refit(kind, clothing_split, mean, spread):
    """The Gram-matrix whitening is the same fit as the SVD one: same decisions, same scores,
    with few samples (10 per class) and with more rows than the MAX_FIT_ROWS used for the spread."""
    train, test = clothing_split
    queries = np.vstack(list(test.classes.values()))
    for shots in (10, 30):
        samples = {c: v[:shots] for c, v in train.classes.items()}
        new, old = Head(kind, mean=mean, spread=spread), SvdHead(kind, mean=mean, spread=spread)
        new.set_samples(samples)
        old.set_samples(samples)
        (ci_new, gi_new), (ci_old, gi_old) = new.evaluate(queries), old.evaluate(queries)
        assert np.abs(ci_new - ci_old).max() < 1e-4
        assert np.array_equal(gi_new, gi_old)
        assert np.array_equal(new.predict(queries)[0], old.predict(queries)[0])
        assert np.array_equal(new.predict_closed(queries), old.predict_closed(queries))


@pytest.fixture(scope="module")
def registry(calibration, engine):
    """Embeddings of the 63 registry photos (landscapes, wallpapers, objects): not clothes."""
    return load_unknown(calibration / "registry-photos", engine.embed)


@pytest.mark.parametrize("shots", [1, 3, 5, 10])
@pytest.mark.parametrize("classes", [2, 3, 0])
def test_never_worse_than_the_plain_nearest_centroid(shots, classes, clothing_split, mean, spread):
    """Issue 12: on the same draws, the head's closed-set accuracy is at least the plain L2
    nearest centroid's minus 0.5 points."""
    train, test = clothing_split
    r = run_trials(train, test, shots=shots, trials=40, classes=classes,
                   head_factory=lambda: Head(mean=mean, spread=spread))
    gain = r["accuracy"] - r["baseline_accuracy"]
    assert gain >= -0.005, f"{shots} shots, {classes or 'all'} classes: {gain:+.3f}"


@pytest.mark.xfail(strict=True, reason="target of issue 12 not reached: measured +0.91 points "
                   "over these 6 seeds x 100 trials (s.e. 0.12); see docs/head.md")
def test_three_classes_at_ten_shots_gain_a_point(clothing_split, mean, spread):
    """Measured over 600 draws: one seed of 40 trials has a standard error of about 0.3 points,
    as large as the gap to the target."""
    train, test = clothing_split
    gains = [run_trials(train, test, shots=10, trials=100, classes=3, seed=seed,
                        head_factory=lambda: Head(mean=mean, spread=spread)) for seed in range(6)]
    assert np.mean([r["accuracy"] - r["baseline_accuracy"] for r in gains]) >= 0.01


def test_a_frame_at_the_gate_views_length_decides_like_each_views_own(clothing_split, mean, spread):
    """A frame is scored at its whitened length in the gate view only, the prior's view's scores
    rescaled by the two lengths' mean ratio over the kit's samples (edge.head._Frame): its
    choices are those of each view at its own length for all but a few photos, on kits of
    2, 3 and all classes at 3 and 10 shots and of bursts."""
    train, test = clothing_split
    queries = np.vstack(list(test.classes.values()))
    rng = np.random.default_rng(0)
    changed, scores, n = 0, [], 0
    for classes, shots, burst in ((2, 10, 1), (3, 10, 1), (3, 3, 1), (10, 10, 1), (10, 3, 1), (3, 10, 20)):
        for _ in range(3):
            names = sorted(rng.choice(sorted(train.classes), classes, replace=False))
            taught = {c: np.repeat(train.classes[c][rng.permutation(len(train.classes[c]))[:shots]], burst, axis=0)
                      for c in names}
            head = Head(mean=mean, spread=spread)
            head.set_samples(taught)
            fit = head._ensure_fit()
            assert len(fit["views"]) == 2
            g = gate_features(queries, mean)
            own = np.mean([(g @ v.numerators.T) / v.lengths(g)[:, None] for v in fit["views"]], axis=0)
            w = fit["plain_weight"]
            exact = (1 - w) * own + w * (l2_normalize(queries) @ fit["plain"].T)
            framed = head.evaluate(queries)[0]
            changed += int(np.count_nonzero(exact.argmax(axis=1) != framed.argmax(axis=1)))
            scores.append(np.abs(exact - framed).ravel())
            n += len(queries)
    scores = np.concatenate(scores)
    print(f"choices changed: {changed} of {n}; score difference {scores.mean():.4f} on average, "
          f"{np.percentile(scores, 99):.4f} at the 99th percentile, {scores.max():.4f} at most")
    assert changed <= 0.005 * n and scores.mean() < 0.01


@pytest.mark.parametrize("kind", ["centroid", "knn"])
def test_a_big_class_does_not_win_by_count(kind, clothing_split, mean, spread):
    """200 samples of one class (its 10 photos, each as a burst of 20 near-duplicates) next to
    10 of another: the small class's photos are recognised as well as with 10 against 10."""
    train, test = clothing_split
    rng = np.random.default_rng(0)
    big, small = "shirt", "t-shirt"     # the pair clothing-small confuses most
    frames = np.repeat(train.classes[big][:10], 20, axis=0)
    frames = frames * rng.uniform(0.97, 1.03, frames.shape).astype(np.float32)
    recall = {}
    for name, big_samples in (("balanced", train.classes[big][:10]), ("imbalanced", frames)):
        head = Head(kind, mean=mean, spread=spread)
        head.set_samples({big: big_samples, small: train.classes[small][:10]})
        recall[name] = float((head.predict_closed(test.classes[small]) == 1).mean())
    assert recall["imbalanced"] >= recall["balanced"] - 0.05, recall


def test_knn_frames_with_many_samples_decide_like_the_full_product(clothing, engine, clothing_split, mean):
    """Over KNN_EXACT_MAX real samples (every training photo as 4 burst frames) a single frame
    goes through the principal-subspace pass; its scores stay within 0.01 of the full product
    and its choice is the same for every test photo."""
    from edge.head import KNN_EXACT_MAX
    train, test = clothing_split
    samples = {c: embed_bursts(list_images(clothing / "train" / c), engine.embed, 4).reshape(-1, engine.dim)
               for c in train.classes}
    assert sum(len(v) for v in samples.values()) > KNN_EXACT_MAX
    head = Head("knn", mean=mean)
    head.set_samples(samples)
    queries = np.vstack(list(test.classes.values()))
    batch = head.evaluate(queries)[0]
    frames = np.vstack([head.evaluate(q[np.newaxis])[0] for q in queries])
    assert np.abs(frames - batch).max() < 0.01
    assert np.array_equal(frames.argmax(axis=1), batch.argmax(axis=1))


def test_trials_report_the_curve_auroc_kits_and_bursts(clothing, engine, clothing_split, registry, mean, spread):
    train, test = clothing_split
    head = lambda: Head(mean=mean, spread=spread)
    r = run_trials(train, test, shots=5, trials=4, classes=3, holdout=2, unknown=registry,
                   head_factory=head)
    assert r["taught_classes"] == 3 and r["holdout_classes"] == 2
    assert sum(1 for v in r["per_class"].values()) <= 10
    assert 0.5 < r["holdout_auroc"] <= 1.0 and r["unknown_auroc"] > 0.9
    offsets = [p["offset"] for p in r["curve"]]
    assert offsets == sorted(offsets) and 0.0 in offsets
    at = {p["offset"]: p for p in r["curve"]}
    assert at[0.0]["known_accuracy"] == pytest.approx(r["known_accuracy"])
    assert at[0.0]["holdout_unknown_rate"] == pytest.approx(r["holdout_unknown_rate"])
    ka = [p["known_accuracy"] for p in r["curve"]]
    hu = [p["holdout_unknown_rate"] for p in r["curve"]]
    assert ka == sorted(ka, reverse=True) and hu == sorted(hu)   # a higher threshold: fewer known, more unknown
    assert ka[0] <= r["accuracy"] + 1e-9
    # bursts: 3 frames per shot, the first frame is the photo itself
    few = {c: list_images(clothing / "train" / c)[:4] for c in ("hat", "shoes")}
    bursts = {c: embed_bursts(f, engine.embed, 3) for c, f in few.items()}
    assert bursts["hat"].shape == (4, 3, engine.dim)
    assert np.allclose(bursts["hat"][:, 0], train.classes["hat"][:4])
    unit = l2_normalize(bursts["hat"])
    near = [float(unit[i, 0] @ unit[i, k]) for i in range(4) for k in (1, 2)]
    assert all(0.6 < s < 0.9999 for s in near), near   # near-duplicates, not copies
    rb = run_trials(Split({c: b[:, 0] for c, b in bursts.items()}, bursts), test.__class__(
        {c: test.classes[c] for c in few}), shots=2, trials=2, head_factory=head)
    assert rb["burst"] == 3 and rb["accuracy"] > 0.7


@pytest.mark.parametrize("classes, seeds", [(2, 3), (3, 3), (0, 1)])
def test_the_gate_spends_two_to_three_points_at_every_class_count(classes, seeds, clothing_split, mean, spread):
    """Issue 12: with `threshold: auto` known accuracy drops by about 2-3 points at 10 shots,
    whatever the kit's size: at most 3, at least 1.5 (one budget for every kit size failed both
    ends: over 3 with 2 classes, under 1.5 with all; docs/head.md). Pooled draws: one seed of
    40 trials of 2 classes moves by half a point."""
    train, test = clothing_split
    runs = [run_trials(train, test, shots=10, trials=100, classes=classes, seed=seed,
                       head_factory=lambda: Head(mean=mean, spread=spread)) for seed in range(seeds)]
    cost = np.mean([r["accuracy"] - r["known_accuracy"] for r in runs])
    assert 0.015 <= cost <= 0.03, (classes, cost)


@pytest.mark.parametrize("classes", [3, 0])
def test_the_gate_catches_classes_never_taught(classes, clothing_split, mean, spread):
    """Issue 12: photos of 2 classes never taught are called unknown at least 15 % of the time
    (3 taught or 8 taught; 0.207 and 0.206 over 300 draws). Unrelated photos are measured by
    benchmarks/head_eval.py on photos the reference mean never saw; the registry photos here
    made the shipped mean."""
    train, test = clothing_split
    r = run_trials(train, test, shots=10, trials=100, classes=classes, holdout=2,
                   head_factory=lambda: Head(mean=mean, spread=spread))
    assert r["holdout_unknown_rate"] >= 0.15, r


def test_the_gate_keeps_its_budget_with_bursts(clothing, engine, clothing_split, mean, spread):
    """Shots taught as bursts of near-duplicate frames (how the box records): the gate costs
    about what it costs with single photos, not most of the known photos (issue 12: it cost
    60 points at 3 shots when a left-out frame's burst still vouched for it)."""
    train, test = clothing_split
    names = ("dress", "pants", "shoes")
    files = {c: list_images(clothing / "train" / c)[:10] for c in names}
    bursts = {c: embed_bursts(f, engine.embed, 3) for c, f in files.items()}
    split = Split({c: b[:, 0] for c, b in bursts.items()}, bursts)
    sub = Split({c: test.classes[c] for c in names})
    for shots in (3, 5):
        r = run_trials(split, sub, shots=shots, trials=10, head_factory=lambda: Head(mean=mean, spread=spread))
        assert r["known_accuracy"] >= r["accuracy"] - 0.06, (shots, r["known_accuracy"], r["accuracy"])


@pytest.mark.parametrize("scene", [None, 0, 21, 42])
def test_one_view_per_class_still_says_unknown_when_every_picture_shares_a_scene(scene, clothing_split, registry,
                                                                                 mean, spread):
    """One photo per class (no leave-one-out score yet, the threshold from the kit): a camera
    fixed over one table sees the table in every frame. A frame's embedding pools its features
    over the picture, so the scene is simulated as one registry photo's embedding added at half
    weight to every other. The classes' similarity to each other sets the threshold (docs/head.md,
    "One view per class"); the fixed 0.3 used before called 14-30 % of these unrelated photos
    unknown with a shared scene, and cost 10 points without one."""
    train, test = clothing_split
    others = np.delete(registry, [] if scene is None else [scene], axis=0)
    mix = (lambda x: x) if scene is None else (lambda x: x + 0.5 * registry[scene])
    r = run_trials(Split({c: mix(v) for c, v in train.classes.items()}),
                   Split({c: mix(v) for c, v in test.classes.items()}), shots=1, trials=40, classes=3,
                   unknown=mix(others), head_factory=lambda: Head(mean=mean, spread=spread))
    # measured: 0.89-0.98 unknown for 3.0-4.9 points (the fixed 0.3: 0.14-0.30 with the scene,
    # 0.997 for 9.9 points without)
    assert r["unknown_rate"] >= 0.8, r["unknown_rate"]
    assert r["accuracy"] - r["known_accuracy"] <= 0.07, (r["accuracy"], r["known_accuracy"])


def test_a_taught_nothing_class_turns_unrelated_photos_unknown(clothing_split, registry, mean, spread):
    """Some unrelated photos taught as "nothing": the others come back unknown more often than
    without it, and known accuracy holds."""
    train, test = clothing_split
    r = run_trials(train, test, shots=10, trials=6, classes=3, unknown=registry, nothing=registry,
                   nothing_shots=20, head_factory=lambda: Head(mean=mean, spread=spread))
    assert r["nothing_images"] == 63 and r["nothing_shots"] == 20
    assert r["nothing_unknown_rate"] >= r["unknown_rate"] - 0.02
    assert r["nothing_unknown_rate"] > 0.9
    assert r["nothing_known_accuracy"] >= r["known_accuracy"] - 0.03


def test_nothing_class_takes_part_in_the_choice_but_answers_unknown(clothing_split, registry, mean, spread):
    train, test = clothing_split
    head = Head(mean=mean, threshold=-1.0, spread=spread)     # gate always open: only the choice decides
    head.set_samples({"hat": train.classes["hat"][:10], "shoes": train.classes["shoes"][:10],
                      "table": registry[:30]})
    head.set_nothing(["table"])
    assert head.labels == ["hat", "shoes", "table"] and head.nothing == ["table"]
    closed = head.predict_closed(registry[30:])
    assert (closed == 2).mean() > 0.5                  # the nothing class wins most such frames
    idx, _ = head.predict(registry[30:])
    assert set(idx[closed == 2]) == {-1}               # ... and answers unknown for them
    hats = head.predict(test.classes["hat"])[0]
    assert (hats == 0).mean() > 0.8
    head.set_nothing([])
    assert (head.predict(registry[30:])[0] == 2).mean() > 0.5   # a plain class again


def test_eval_cli_classes_bursts_and_nothing(clothing, calibration):
    out = subprocess.run([sys.executable, "-m", "edge", "eval", str(clothing), "--shots", "3", "--trials", "2",
                          "--classes", "3", "--holdout-classes", "2", "--burst", "2", "--json",
                          "--nothing", str(calibration / "registry-photos"), "--nothing-shots", "10"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["taught_classes"] == 3 and r["burst"] == 2 and r["nothing_shots"] == 10
    assert {"curve", "holdout_auroc", "nothing_unknown_rate", "nothing_known_accuracy"} <= set(r)
    bad = subprocess.run([sys.executable, "-m", "edge", "eval", str(clothing), "--classes", "12"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--classes must be between 2 and 10" in bad.stderr
    assert "Traceback" not in bad.stderr
