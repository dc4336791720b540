"""The head: pure numpy scoring, learning and forgetting."""

import numpy as np
import pytest

from edge.head import Head, l2_normalize


def blobs(rng, centre, n, noise=0.1):
    return centre + noise * rng.standard_normal((n, centre.size)).astype(np.float32)


@pytest.mark.parametrize("kind", ["centroid", "knn"])
def test_learns_and_predicts_two_classes(kind):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    head = Head(kind)
    head.add("a", blobs(rng, a, 5))
    head.add("b", blobs(rng, b, 5))
    idx, score = head.predict(np.vstack([blobs(rng, a, 3), blobs(rng, b, 3)]))
    assert list(idx) == [0, 0, 0, 1, 1, 1]
    assert (score > 0.8).all() and (score <= 1.0001).all()


def test_knn_is_not_won_by_count():
    """A class with many loose samples must not beat a tight small class on its own ground."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(32), rng.standard_normal(32)
    head = Head("knn", k=3)
    head.add("big", blobs(rng, a, 200, noise=0.6))
    head.add("small", blobs(rng, b, 3, noise=0.05))
    idx, _ = head.predict(blobs(rng, b, 10, noise=0.05))
    assert (idx == 1).all()


def test_undo_clear_and_counts():
    head = Head()
    head.add("a", np.eye(4)[:3])
    head.add("b", np.eye(4)[3:])
    head.remove_last("a", 2)
    assert head.counts() == {"a": 1, "b": 1}
    head.remove_last("a", 5)
    assert head.labels == ["b"]
    head.clear("b")
    assert head.labels == [] and head.predict(np.ones(4))[0][0] == -1
    head.add("c", np.ones(4))
    head.clear()
    assert head.counts() == {}


def test_centering_changes_the_comparison():
    centre = np.array([1.0, 1.0, 0.0], np.float32)
    head = Head(center=centre)
    head.add("x", np.array([2.0, 1.0, 0.0]))
    # After centring, [2,1,0] points along +x; [1,2,0] points along +y: orthogonal.
    assert abs(head.scores(np.array([1.0, 2.0, 0.0]))[0, 0]) < 1e-6
    plain = Head()
    plain.add("x", np.array([2.0, 1.0, 0.0]))
    assert abs(plain.scores(np.array([1.0, 2.0, 0.0]))[0, 0]) > 0.5


def test_l2_normalize_leaves_zero_rows_alone():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_unknown_head_kind_is_refused():
    with pytest.raises(ValueError, match="head must be"):
        Head("svm")
