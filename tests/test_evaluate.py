"""The head on real embeddings (the default int8 model on clothing-small) and `edge.evaluate`."""

import numpy as np
import pytest

from edge.engine import load_reference
from edge.evaluate import load_dataset
from edge.head import Head
from head_reference import SvdHead


@pytest.fixture(scope="module")
def clothing_split(clothing, engine):
    """(train, test) embeddings of clothing-small, embedded once for this module."""
    return load_dataset(clothing, engine.embed)


@pytest.fixture(scope="module")
def mean(engine):
    return load_reference(engine.path, engine.dim)


@pytest.mark.parametrize("kind", ["centroid", "knn"])
def test_gram_refit_decides_like_the_svd_refit(kind, clothing_split, mean):
    """The Gram-matrix whitening is the same fit as the SVD one: same decisions, same scores,
    with few samples (10 per class) and with more rows than the 256 used for the spread."""
    train, test = clothing_split
    queries = np.vstack(list(test.classes.values()))
    for shots in (10, 30):
        samples = {c: v[:shots] for c, v in train.classes.items()}
        new, old = Head(kind, mean=mean), SvdHead(kind, mean=mean)
        new.set_samples(samples)
        old.set_samples(samples)
        (ci_new, gi_new), (ci_old, gi_old) = new.evaluate(queries), old.evaluate(queries)
        assert np.abs(ci_new - ci_old).max() < 1e-4
        assert np.array_equal(gi_new, gi_old)
        assert np.array_equal(new.predict(queries)[0], old.predict(queries)[0])
        assert np.array_equal(new.predict_closed(queries), old.predict_closed(queries))
