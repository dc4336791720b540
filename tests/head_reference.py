"""The head's fit as it was before the Gram-matrix refit and its Woodbury form (one SVD of the
residuals, then each class mean or, for k-NN, every sample whitened): the oracle that
tests/test_evaluate.py and benchmarks/head_bench.py compare the fast fit against (same residual
rows)."""

import numpy as np

from edge.head import SHRINK, Head, _knn_index, _knn_scores, _View, l2_normalize, spread_factor


def svd_whitener(residuals, n, squares):
    """(basis, scale, 1 / sqrt(lambda)) of S = R^T R / n + lambda I: R the rows (fewer than the n
    residuals they stand for when a class's were cut to their top directions), lambda from the
    residuals' sum of squares."""
    dim = residuals.shape[1]
    if n < 2 or not np.any(residuals):
        return np.zeros((0, dim), np.float32), np.zeros(0, np.float32), np.float32(1.0)
    _, s, vt = np.linalg.svd(residuals, full_matrices=False)
    var = (s ** 2) / n
    lam = max(SHRINK * squares / n / dim, 1e-12)
    scale = 1.0 / np.sqrt(var + lam) - 1.0 / np.sqrt(lam)
    return vt.astype(np.float32), scale.astype(np.float32), np.float32(1.0 / np.sqrt(lam))


class SvdHead(Head):
    """Head whose choice view is fitted the old way: an SVD of up to MAX_FIT_ROWS x dim residuals, then
    the class means (or every sample, for k-NN) whitened; a frame's whitened length from all
    the SVD's directions."""

    def _choice_fit(self, groups, parts, blocks, mapped=None):
        rows = [b for _, b in blocks]
        factor = spread_factor(rows)
        basis, scale, inv_sqrt_lam = svd_whitener(np.vstack([b.rows for b in rows]) * factor, sum(b.count for b in rows),
                                                  sum(b.squares for b in rows) * factor ** 2)
        root = lambda q: q * inv_sqrt_lam + ((q @ basis.T) * scale) @ basis      # q P^(1/2)
        white = lambda q: l2_normalize(root(q))
        if self.kind == "centroid":     # each class's mean, whitened; P q.m / |q|_P by every direction
            numerators = root(white(np.stack([g.mean(axis=0) for g in groups])))
            weights = ((scale + inv_sqrt_lam) ** 2 - inv_sqrt_lam ** 2).astype(np.float32)
            if mapped is not None:      # the prior's view: what the head then adds for it takes these mapped
                numerators, basis = self.prior.apply(numerators), self.prior.apply(basis)
            dim = basis.shape[1]
            keep = weights < 0      # a direction without spread has weight 0: the kernel stays positive definite
            return _View(numerators, float(inv_sqrt_lam) ** 2, np.zeros((0, dim), np.float32), np.zeros(0, np.float32),
                         basis[keep], np.diag(-weights[keep]))
        index = _knn_index([white(g) for g in groups])
        return lambda q: _knn_scores(index, white(q), self.k)
