"""The head and the smoother: pure numpy, no fixtures."""

import numpy as np
import pytest

from edge.head import (FALLBACK_THRESHOLD, SPREAD_RANK, Head, PriorMap, gate_features, l2_normalize,
                       signed_sqrt, spread_prior)
from edge.smoothing import UNKNOWN, Smoother


def blobs(rng, centre, n, noise=0.1):
    return (centre + noise * rng.standard_normal((n, centre.size))).astype(np.float32)


@pytest.fixture
def two_classes():
    rng = np.random.default_rng(1)
    a, b = np.abs(rng.standard_normal(64)) * 3, np.abs(rng.standard_normal(64)) * 3
    return rng, a, b


def world_mean(rng, dim=64):
    """A reference mean like the box's (everyday photos): here, of photos like the strangers."""
    return signed_sqrt(np.abs(rng.standard_normal((500, dim))) * 3).mean(axis=0)


@pytest.mark.parametrize("kind", ["centroid", "knn"])
def test_learns_two_classes_and_rejects_a_stranger(kind, two_classes):
    rng, a, b = two_classes
    head = Head(kind, mean=world_mean(rng))
    head.set_samples({"a": blobs(rng, a, 8), "b": blobs(rng, b, 8)})
    idx, sim = head.predict(np.vstack([blobs(rng, a, 3), blobs(rng, b, 3)]))
    assert list(idx) == [0, 0, 0, 1, 1, 1]
    stranger = np.abs(rng.standard_normal((5, 64))).astype(np.float32) * 3
    assert (head.predict(stranger)[0] == -1).all()
    assert (head.predict_closed(stranger) >= 0).all()  # closed set always names a class


def test_knn_is_not_won_by_count():
    """A class with many loose samples must not beat a tight small class on its own ground."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(32), rng.standard_normal(32)
    head = Head("knn", k=3, threshold=-1.0)
    head.set_samples({"big": blobs(rng, a, 200, noise=0.6), "small": blobs(rng, b, 3, noise=0.05)})
    assert (head.predict(blobs(rng, b, 10, noise=0.05))[0] == 1).all()


def test_whitening_discounts_directions_the_classes_vary_in():
    """Two classes differ slightly in x, and vary a lot in y: plain cosine gets confused by y,
    the within-class whitening does not."""
    rng = np.random.default_rng(5)
    base = np.zeros(8, np.float32)
    base[2] = 5.0

    def make(sign, n):
        x = np.tile(base, (n, 1))
        x[:, 0] = sign * 0.5
        x[:, 1] = rng.normal(0, 3.0, n)
        return x

    head = Head(threshold=-1.0)
    head.set_samples({"left": make(-1, 30), "right": make(1, 30)})
    queries = make(1, 200)
    assert (head.predict_closed(queries) == 1).mean() > 0.9


def test_set_class_undo_and_threshold_setting(two_classes):
    rng, a, b = two_classes
    head = Head()
    head.set_samples({"a": blobs(rng, a, 4)})
    head.set_class("b", blobs(rng, b, 4))
    assert head.counts() == {"a": 4, "b": 4} and head.labels == ["a", "b"]
    head.set_class("a", np.zeros((0, 64), np.float32))
    assert head.labels == ["b"]
    head.set_threshold(0.42)
    assert head.threshold == 0.42
    head.set_threshold("auto")
    assert head.threshold != 0.42


def toy_spread(rng, dim=64, photos=40, views=6):
    """A spread prior like `edge reference` makes (augmented views of everyday photos): here,
    views that vary mostly in a few directions."""
    photo = np.abs(rng.standard_normal((photos, 1, dim))) * 3
    wobble = rng.standard_normal((photos, views, 4)) @ rng.standard_normal((4, dim))
    return spread_prior((photo + 0.3 * wobble + 0.05 * rng.standard_normal((photos, views, dim))).astype(np.float32),
                        world_mean(rng, dim))


@pytest.mark.parametrize("kind,with_spread", [("centroid", False), ("knn", False), ("centroid", True)])
def test_a_refit_after_changes_decides_like_a_fresh_head(kind, with_spread):
    """A refit keeps what depends on one class alone between refits (in the spread prior's view
    too): after recording, undo, removing and re-teaching a class (and marking one "nothing"),
    it must decide exactly like a head built from scratch on the same samples."""
    rng = np.random.default_rng(5)
    centres = [np.abs(rng.standard_normal(64)) * 3 for _ in range(4)]
    mean = world_mean(rng)
    spread = toy_spread(rng) if with_spread else None
    head = Head(kind, mean=mean, spread=spread)
    raw = {f"c{i}": blobs(rng, c, 12, noise=0.6) for i, c in enumerate(centres[:3])}
    head.set_samples(raw)
    head.threshold                                   # fit once, so the per-class parts exist
    queries = np.vstack([blobs(rng, c, 6, noise=0.8) for c in centres])
    steps = [lambda: raw.__setitem__("c0", np.vstack([raw["c0"], blobs(rng, centres[0], 5, 0.6)])),
             lambda: raw.__setitem__("c1", raw["c1"][:4]),
             lambda: raw.pop("c2"),
             lambda: raw.__setitem__("c3", blobs(rng, centres[3], 9, noise=0.6)),
             lambda: raw.__setitem__("c2", blobs(rng, centres[2], 3, noise=0.6))]
    for step in steps:
        step()
        for name in set(head.labels) - set(raw):
            head.set_class(name, np.zeros((0, 64), np.float32))
        for name, vectors in raw.items():
            head.set_class(name, vectors)
        head.set_nothing(["c1"] if "c3" in raw else [])
        fresh = Head(kind, mean=mean, spread=spread)
        fresh.set_samples({n: raw[n] for n in head.labels})   # same class order as head's
        fresh.set_nothing(head.nothing)
        assert head.labels == fresh.labels
        assert head.threshold == pytest.approx(fresh.threshold, abs=1e-6)
        for a, b in zip(head.evaluate(queries), fresh.evaluate(queries)):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert (head.predict(queries)[0] == fresh.predict(queries)[0]).all()


@pytest.mark.parametrize("prior", ["float32", "float16", "not orthogonal"])
def test_centroid_choice_is_the_whitened_cosines_written_out(prior):
    """The centroid head scores a frame with one product (edge.head._Frame); its choice must be,
    written out with dense matrices: the mean of the whitened cosines to the class means in the
    gate view and in the prior's view (x (PRIOR_WEIGHT C + PRIOR_SHRINK I / dim)^(-1/2), C the
    prior's rows^T rows with the rest of a unit trace spread evenly), the latter taken at the
    frame's whitened length in the gate view times the mean ratio of the two lengths over the
    taught samples (here all of them), blended with the plain cosine of the raw embeddings; its
    gate scores (a fixed threshold: no relative test) the cosines to the class means. The prior
    as `edge reference` writes it (float16: orthogonal to about 1e-4 only), and rows that are
    not orthogonal at all (accepted by engine.load_spread)."""
    from edge.head import PRIOR_SHRINK, PRIOR_WEIGHT, SHRINK
    rng = np.random.default_rng(11)
    spread, mean = toy_spread(rng), world_mean(rng)
    if prior == "float16":
        spread = spread.astype(np.float16).astype(np.float32)
    elif prior == "not orthogonal":     # the same C from twice the rows
        spread = np.vstack([spread[:16], spread[:16]]) / np.sqrt(2.0)
    centres = [np.abs(rng.standard_normal(64)) * 3 for _ in range(3)]
    raw = {f"c{i}": blobs(rng, c, 12, 0.6) for i, c in enumerate(centres)}
    head = Head(mean=mean, spread=spread, threshold=-1.0)
    head.set_samples(raw)
    queries = np.vstack([blobs(rng, c, 5, 0.6) for c in centres] + [np.abs(rng.standard_normal((5, 64))) * 3])

    def whitener(groups):
        """P = S^-1, S = R^T R / n + lambda I from the groups' residuals, each group weighing the same."""
        res = np.vstack([(v - v.mean(axis=0)) for v in groups]).astype(np.float64)
        n, dim = res.shape
        s = res.T @ res / n
        return np.linalg.inv(s + SHRINK * np.trace(s) / dim * np.eye(dim))

    def length(x, p):
        x = x.astype(np.float64)
        return np.sqrt(np.einsum("ij,jk,ik->i", x, p, x))

    def cosines(groups, q, p):
        """Whitened cosines of rows q to the groups' means."""
        m = np.stack([v.mean(axis=0) for v in groups]).astype(np.float64)
        return (q.astype(np.float64) @ p @ m.T) / length(q, p)[:, None] / length(m, p)[None, :]

    rows = spread.astype(np.float64)
    dim = rows.shape[1]
    c = rows.T @ rows
    vals, vecs = np.linalg.eigh(c)
    inside = vals > vals.max() * 1e-9
    vals[~inside] = (1.0 - vals[inside].sum()) / max(dim - inside.sum(), 1)
    tilt_matrix = (vecs / np.sqrt(PRIOR_WEIGHT * vals + PRIOR_SHRINK / dim)) @ vecs.T
    tilt = lambda x: l2_normalize((x.astype(np.float64) @ tilt_matrix).astype(np.float32))
    g = [gate_features(v, mean) for v in raw.values()]
    q = gate_features(queries, mean)
    tilted = [tilt(v) for v in g]
    p1, p2 = whitener(g), whitener(tilted)
    gate_length = lambda x: length(x, p1)
    prior_length = lambda x: length(x.astype(np.float64) @ tilt_matrix, p2)     # of x T, not made unit
    taught = np.vstack(g)
    at_gate_length = prior_length(q) / gate_length(q) * np.mean(gate_length(taught) / prior_length(taught))
    whitened = 0.5 * (cosines(g, q, p1) + cosines(tilted, tilt(q), p2) * at_gate_length[:, None])
    plain = l2_normalize(queries) @ l2_normalize(np.stack([l2_normalize(v).sum(axis=0) for v in raw.values()])).T
    w = head._ensure_fit()["plain_weight"]
    choice, gate = head.evaluate(queries)
    np.testing.assert_allclose(choice, (1 - w) * whitened + w * plain, atol=1e-5)
    np.testing.assert_allclose(gate, q @ l2_normalize(np.stack([v.mean(axis=0) for v in g])).T, atol=1e-5)


def test_the_spread_prior_is_its_top_eigenpairs_and_its_view_counts_their_directions_less():
    """spread_prior keeps the top SPREAD_RANK (here all 64) eigenpairs of the within-photo spread
    as rows sqrt(share of the trace) x direction; the prior's view shrinks a direction the views
    vary in against one they do not, and scoring in both views averages two cosines."""
    rng = np.random.default_rng(3)
    rows = toy_spread(rng)
    assert rows.shape == (min(SPREAD_RANK, 64), 64)
    assert float(np.sum(rows.astype(np.float64) ** 2)) == pytest.approx(1.0, abs=1e-4)
    shares = np.sum(rows ** 2, axis=1)
    assert (np.diff(shares) <= 1e-6).all()
    assert shares[:4].sum() > 0.6 and shares[4] < 0.2 * shares[3]    # the 4 wobble directions first
    mapped = PriorMap(rows)
    top, flat = rows[0] / np.linalg.norm(rows[0]), rows[-1] / np.linalg.norm(rows[-1])
    x = l2_normalize((top + flat)[np.newaxis])
    y = mapped(x)[0]
    assert abs(y @ top) < 0.5 * abs(y @ flat)         # the direction that varies counts less
    assert np.linalg.norm(y) == pytest.approx(1.0, abs=1e-5)
    head = Head(mean=world_mean(rng), spread=rows)
    assert Head("knn", spread=rows).prior is None      # k-NN: one view (its per-frame cost)
    a, b = np.abs(rng.standard_normal(64)) * 3, np.abs(rng.standard_normal(64)) * 3
    head.set_samples({"a": blobs(rng, a, 8), "b": blobs(rng, b, 8)})
    assert (head.predict(np.vstack([blobs(rng, a, 5), blobs(rng, b, 5)]))[0] == [0] * 5 + [1] * 5).all()


def test_a_longer_spread_prior_is_cut_to_its_top_rows(monkeypatch):
    """A spread file with more than SPREAD_RANK rows (made before the rank was lowered), in any
    order, maps like its SPREAD_RANK largest rows: what `edge reference` writes now."""
    import edge.head
    rng = np.random.default_rng(4)
    rows = toy_spread(rng)
    monkeypatch.setattr(edge.head, "SPREAD_RANK", 8)
    x = l2_normalize(rng.standard_normal((5, 64)))
    np.testing.assert_allclose(PriorMap(rows[rng.permutation(len(rows))])(x), PriorMap(rows[:8])(x), atol=1e-6)
    assert not np.allclose(PriorMap(rows[8:])(x), PriorMap(rows[:8])(x), atol=1e-3)


def test_a_class_residuals_are_cut_to_its_top_directions():
    """`_residual_rows` with keep: at most keep rows whose scatter R^T R is the residuals' own
    without their weakest directions (the best rank-keep approximation), standing for all of
    them (count, sum of squares); without keep, or with fewer residuals, the residuals."""
    from edge.head import _residual_rows, _view_part
    rng = np.random.default_rng(8)
    g = gate_features(blobs(rng, np.abs(rng.standard_normal(64)) * 3, 40, 0.5) +
                      (rng.standard_normal((40, 3)) @ rng.standard_normal((3, 64)) * 2).astype(np.float32), None)
    full = _residual_rows(_view_part(g), 30)
    assert full.rows.shape == (30, 64) and full.count == 30
    assert full.squares == pytest.approx(float(np.sum(full.rows.astype(np.float64) ** 2)), rel=1e-6)
    cut = _residual_rows(_view_part(g), 30, keep=5)
    assert cut.rows.shape == (5, 64) and cut.count == 30 and cut.squares == pytest.approx(full.squares)
    scatter = full.rows.T.astype(np.float64) @ full.rows
    vals, vecs = np.linalg.eigh(scatter)
    best = (vecs[:, -5:] * vals[-5:]) @ vecs[:, -5:].T
    np.testing.assert_allclose(cut.rows.T.astype(np.float64) @ cut.rows, best, atol=1e-5 * vals.max())
    assert np.array_equal(_residual_rows(_view_part(g), 4, keep=5).rows, _residual_rows(_view_part(g), 4).rows)


def auto_threshold(samples: dict, mean) -> float:
    """The "auto" threshold of a head taught `samples` (raw embeddings per class)."""
    head = Head(mean=mean)
    head.set_samples(samples)
    return head.threshold


def test_auto_threshold_follows_the_spread_of_the_samples():
    rng = np.random.default_rng(3)
    c = np.abs(rng.standard_normal(64)) * 3
    mean = world_mean(rng)
    # tight, but mostly distinct views (near-duplicates are another test)
    tight = {"c": blobs(rng, c, 20, 0.8)}
    loose = {"c": blobs(rng, c, 20, 1.5)}
    assert auto_threshold(tight, mean) > auto_threshold(loose, mean)
    assert auto_threshold({"c": blobs(rng, c, 1)}, mean) == FALLBACK_THRESHOLD


def test_the_gate_budget_follows_how_often_taught_samples_are_confused():
    """Classes whose left-out samples all land nearest their own class get the smallest share,
    1.55 % (every rejected known frame would have been answered right); look-alike classes get a
    larger one, up to MAX_BUDGET; one class counts as never confused."""
    from edge.head import MAX_BUDGET, _class_part, _loo_scores, gate_budget
    rng = np.random.default_rng(5)
    mean = world_mean(rng)
    a, b = np.abs(rng.standard_normal(64)) * 3, np.abs(rng.standard_normal(64)) * 3
    agreement = {}
    near = a + 0.3 * rng.standard_normal(64)         # a class that looks almost like a
    for name, other, spread in (("apart", b, 0.5), ("mixed", near, 1.5)):
        groups = [gate_features(blobs(rng, c, 12, spread), mean) for c in (a, other)]
        cents = l2_normalize(np.stack([g.mean(axis=0) for g in groups]))
        agreement[name] = _loo_scores([_class_part(g) for g in groups], cents)[3]
    lone = gate_features(blobs(rng, a, 12, 6.0), mean)
    alone = _loo_scores([_class_part(lone)], l2_normalize(lone.mean(axis=0, keepdims=True)))[3]
    assert agreement["apart"] == 1.0 and alone == 1.0
    assert agreement["mixed"] < 0.8, agreement
    assert gate_budget(1.0) == pytest.approx(0.0155, abs=1e-4) and gate_budget(0.9) == pytest.approx(0.02)
    assert gate_budget(0.9) < gate_budget(agreement["mixed"]) <= MAX_BUDGET
    assert gate_budget(0.0) == MAX_BUDGET


def bursts_of(rng, photos, frames=5, noise=0.02):
    """Each row of `photos` as `frames` near-duplicates (consecutive rows), like a held button."""
    rep = np.repeat(photos, frames, axis=0)
    return (rep * rng.uniform(1 - noise, 1 + noise, rep.shape)).astype(np.float32)


def test_near_duplicates_do_not_vouch_for_themselves():
    """A class taught as bursts of near-duplicate frames gets about the threshold and the choice
    scores of the same class taught as one frame per view: leaving one frame out must leave its
    burst out too, else the threshold rejects most new frames (issue 12)."""
    rng = np.random.default_rng(7)
    mean = world_mean(rng)
    centres = [np.abs(rng.standard_normal(64)) * 3 for _ in range(3)]
    photos = {f"c{i}": blobs(rng, c, 6, noise=1.0) for i, c in enumerate(centres)}
    single, burst = Head(mean=mean), Head(mean=mean)
    single.set_samples(photos)
    burst.set_samples({n: bursts_of(rng, v) for n, v in photos.items()})
    assert single.threshold != FALLBACK_THRESHOLD
    assert abs(burst.threshold - single.threshold) < 0.03, (burst.threshold, single.threshold)
    queries = np.vstack([blobs(rng, c, 20, noise=1.0) for c in centres])
    s_single, g_single = single.evaluate(queries)
    s_burst, g_burst = burst.evaluate(queries)
    assert np.abs(s_burst - s_single).max() < 0.03
    assert np.array_equal(single.predict_closed(queries), burst.predict_closed(queries))
    a_single, a_burst = (single.predict(queries)[0] >= 0).mean(), (burst.predict(queries)[0] >= 0).mean()
    assert a_burst >= a_single - 0.05, (a_burst, a_single)


@pytest.mark.parametrize("scene", [0.0, 2.0])
def test_one_view_per_class_gets_the_classes_similarity_as_threshold(scene):
    """Each class one photo as a burst of near-duplicates: no honest leave-one-out score exists,
    as with one sample per class. The threshold is then the mean cosine between the classes'
    centroids in the gate view ("nothing" classes too), at least FALLBACK_THRESHOLD: with a scene
    shared by every picture it rises with it, where a fixed threshold would let anything in."""
    rng = np.random.default_rng(8)
    mean = world_mean(rng)
    shared = np.abs(rng.standard_normal(64)) * 3 * scene
    photos = {f"c{i}": blobs(rng, np.abs(rng.standard_normal(64)) * 3 + shared, 1) for i in range(4)}
    head = Head(mean=mean)
    taught = {n: bursts_of(rng, p) for n, p in photos.items()}
    head.set_samples(taught)
    head.set_nothing(["c3"])
    cents = l2_normalize(np.stack([gate_features(taught[n], mean).mean(axis=0) for n in head.labels]))
    cross = np.mean([cents[i] @ cents[j] for i in range(4) for j in range(4) if i != j])
    assert head.threshold == pytest.approx(max(FALLBACK_THRESHOLD, cross), abs=1e-6)
    assert (cross > 0.5) == (scene > 0), cross
    assert Head(mean=mean).threshold == FALLBACK_THRESHOLD            # nothing taught
    lone = Head(mean=mean)
    lone.set_samples({"c0": photos["c0"]})
    assert lone.threshold == FALLBACK_THRESHOLD                       # one class: nothing to compare with


def test_threshold_is_a_prediction_bound_that_widens_with_few_scores():
    """The same scores set a lower threshold when they stand for fewer samples (Student-t
    prediction bound); t quantiles at 3 %: -2.150 for 9 and -2.000 for 19 degrees of freedom."""
    from edge.head import _budget_threshold
    values = np.random.default_rng(9).normal(0.5, 0.1, 200)
    m, s = values.mean(), values.std(ddof=1)
    for n, t in ((10, -2.150), (20, -2.000)):
        assert _budget_threshold(values, 0.03, n) == pytest.approx(m + t * s * np.sqrt(1 + 1 / n), abs=0.002)
    assert _budget_threshold(values, 0.03, 5) < _budget_threshold(values, 0.03, 20) < _budget_threshold(values, 0.03, 200)


def test_leave_one_out_scores_stand_for_new_samples_against_the_full_centroid():
    """A class of m views: a left-out sample meets the centroid of m - 1, a new one that of all m.
    Corrected by `_full_centroid_gain`, the mean leave-one-out score is the mean new sample's
    (400 draws, 50 new samples each): 3 photos, and 2 photos as bursts of 5 frames (m counts
    views, not frames), within 0.005 over seeds 0-7; uncorrected 0.03 and 0.08 lower."""
    from edge.head import _class_part
    rng = np.random.default_rng(4)
    dim = 256
    noisy = lambda base, k, scale: l2_normalize(base + rng.normal(0, 1, (k, dim)) * scale / np.sqrt(dim))
    for photos, frames, raw_gap in ((3, 1, 0.02), (2, 5, 0.05)):
        loo, new, raw = [], [], []
        for _ in range(400):
            mu = rng.normal(0, 1, dim) * 0.7 / np.sqrt(dim)      # |mu|^2 about half of a unit sample
            views = noisy(mu, photos, 0.7)
            g = np.vstack([noisy(v, frames, 0.15) if frames > 1 else v[None] for v in views]).astype(np.float32)
            part = _class_part(g)
            raw.append(part["gate"].mean())
            loo.append(part["gate"].mean() * part["full"])
            new.append(float(np.mean(noisy(mu, 50, 0.7) @ l2_normalize(g.mean(axis=0)))))
        assert abs(np.mean(loo) - np.mean(new)) < 0.006, (photos, frames, np.mean(loo), np.mean(new))
        assert np.mean(new) - np.mean(raw) > raw_gap, (photos, frames, np.mean(raw), np.mean(new))


def test_knn_many_samples_one_frame_matches_the_full_product():
    """Above KNN_EXACT_MAX samples a frame is scored through a principal subspace first; on data
    that the subspace holds (here, 40 dimensions) it gives the full product's scores, also with
    classes smaller than k and than the candidate count (padding), and batches stay exact."""
    from edge.head import KNN_EXACT_MAX
    rng = np.random.default_rng(11)
    basis = rng.standard_normal((40, 256)).astype(np.float32)
    sizes = [700, 400, 2, 9]      # > KNN_EXACT_MAX in all; one class below k = 3, one below 16
    assert sum(sizes) > KNN_EXACT_MAX
    samples = {f"c{i}": np.abs(rng.standard_normal((n, 40)) + 2 * i).astype(np.float32) @ basis
               for i, n in enumerate(sizes)}
    queries = np.vstack([v[:3] * 1.01 for v in samples.values()] + [samples["c0"][5:8] + samples["c3"][:3]])
    head = Head("knn", k=3, threshold=-1.0)
    head.set_samples(samples)
    batch = head.evaluate(queries)[0]                       # many rows: the full product
    frames = np.vstack([head.evaluate(q[np.newaxis])[0] for q in queries])
    assert np.abs(frames - batch).max() < 1e-4
    assert list(batch.argmax(axis=1)[:11]) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]   # c2 has 2 samples


def test_knn_many_identical_frames_one_frame_matches_the_full_product():
    """A frozen camera records the same frame over and over: the coarse pass then ties across a
    whole class (more picks than the candidate count), and a frame still gets the full product's
    scores."""
    from edge.head import KNN_EXACT_MAX
    rng = np.random.default_rng(12)
    still = np.abs(rng.standard_normal((1, 64))).astype(np.float32)
    samples = {"frozen": np.repeat(still, KNN_EXACT_MAX, axis=0),
               "moving": np.abs(rng.standard_normal((40, 64))).astype(np.float32)}
    head = Head("knn", k=3, threshold=-1.0)
    head.set_samples(samples)
    queries = np.vstack([still * 1.02, samples["moving"][:3] + 0.01])
    batch = head.evaluate(queries)[0]                       # many rows: the full product
    frames = np.vstack([head.evaluate(q[np.newaxis])[0] for q in queries])
    assert np.abs(frames - batch).max() < 1e-4
    assert list(frames.argmax(axis=1)) == [0, 1, 1, 1]


def test_knn_mean_of_best_counts_only_a_small_class_own_samples():
    from edge.head import _knn_index, _knn_scores
    groups = [l2_normalize(np.eye(4, dtype=np.float32)[[0, 0, 1]] + 0.1), l2_normalize(np.eye(4, dtype=np.float32)[[2]])]
    w = l2_normalize(np.array([[1.0, 0.2, 0.1, 0.0]], np.float32))
    got = _knn_scores(_knn_index(groups), w, 3)
    want = [np.sort(g @ w[0])[::-1][:3].mean() for g in groups]
    assert np.allclose(got[0], want)


def test_empty_head_knows_nothing():
    head = Head()
    idx, sim = head.predict(np.ones((2, 8), np.float32))
    assert list(idx) == [-1, -1]


def test_reference_mean_is_subtracted_before_comparing():
    mean = np.array([1.0, 1.0, 0.0], np.float32)
    g = gate_features(np.array([[4.0, 1.0, 0.0]]), mean)
    assert np.allclose(g, [[1.0, 0.0, 0.0]])


def test_l2_normalize_leaves_zero_rows_alone():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_unknown_head_kind_is_refused():
    with pytest.raises(ValueError, match="head must be"):
        Head("svm")


# --- smoothing ------------------------------------------------------------------------------

def test_smoother_ignores_a_single_odd_frame():
    s = Smoother(window=5, margin=0.05)
    for _ in range(5):
        assert s.update([0.9, 0.1], [0.8, 0.1], threshold=0.5) == 0
    assert s.update([0.1, 0.9], [0.1, 0.8], threshold=0.5) == 0  # one frame of B
    for _ in range(6):
        last = s.update([0.1, 0.9], [0.1, 0.8], threshold=0.5)
    assert last == 1  # a steady B wins


def test_smoother_hysteresis_around_the_threshold():
    s = Smoother(window=1, margin=0.05)
    assert s.update([1.0], [0.52], threshold=0.5) == 0   # enters above the threshold
    assert s.update([1.0], [0.47], threshold=0.5) == 0   # stays inside the margin
    assert s.update([1.0], [0.44], threshold=0.5) == UNKNOWN  # leaves below it
    assert s.update([1.0], [0.49], threshold=0.5) == UNKNOWN  # re-entering needs the threshold
    assert s.confidence() == 0.0


def test_smoother_resets_when_classes_change():
    s = Smoother(window=3)
    s.update([0.9], [0.9], 0.5)
    assert s.update([0.9, 0.1], [0.9, 0.1], 0.5) == 0  # new shape: fresh start
