"""Small batched dense factorizations that XLA compiles well.

XLA's CPU expansions of batched `qr`, `eigvalsh`, `inv` and `cholesky` on matrices of
a few dozen rows are several times slower than TensorFlow's LAPACK kernels (`eigvalsh`
and `qr` 10-40x at batch 128, n = 20-35). The eliminations below do one step per
column on the whole batch (n steps of O(B n^2) elementwise work), which XLA fuses
well. Outside XLA the LAPACK kernels are used.
"""

from __future__ import annotations

import tensorflow as tf

from keras_implicit._policy import in_xla_context


def _eliminate(aug, n):
    """Gauss-Jordan with row pivoting on aug [B, n, k]: the first n columns become I."""
    rows = tf.range(n)

    def step(j, aug):
        col = tf.gather(aug, j, axis=2)  # [B, n]
        candidates = tf.where(rows[None, :] >= j, tf.abs(col), -tf.ones_like(col))
        p = tf.argmax(candidates, axis=1, output_type=tf.int32)  # [B]
        # swap rows j and p in every batch row
        perm = tf.where(
            rows[None, :] == j,
            p[:, None],
            tf.where(rows[None, :] == p[:, None], j, rows[None, :]),
        )
        aug = tf.gather(aug, perm, axis=1, batch_dims=1)
        col = tf.gather(aug, j, axis=2)
        pivot_row = tf.gather(aug, j, axis=1) / tf.gather(col, j, axis=1)[:, None]  # [B, k]
        factors = tf.where(rows[None, :] == j, tf.zeros_like(col), col)  # [B, n]
        aug = aug - factors[:, :, None] * pivot_row[:, None, :]
        aug = tf.where((rows == j)[None, :, None], pivot_row[:, None, :], aug)
        return j + 1, aug

    _, aug = tf.while_loop(lambda j, _: j < n, step, (tf.constant(0), aug))
    return aug


# largest order inverted by unrolled Gauss-Jordan under XLA (the graph grows as n^1)
UNROLLED_INVERSE_MAX_ORDER = 64


def spd_inverse(matrix):
    """Inverse of a batch of symmetric positive definite matrices (B, n, n).

    Under XLA on CPU, `tf.linalg.inv` and `tf.linalg.cholesky` compile to slow scalar
    loops (about 3x slower than Gauss-Jordan at n = 12, 4x at n = 60); there, for a
    static n up to UNROLLED_INVERSE_MAX_ORDER, Gauss-Jordan elimination is unrolled
    into batched rank-one updates, which XLA fuses. Positive definiteness makes
    pivoting unnecessary. Elsewhere this is `tf.linalg.inv` (LAPACK).
    """
    n = matrix.shape[-1]
    if n is None or n > UNROLLED_INVERSE_MAX_ORDER or not in_xla_context():
        return tf.linalg.inv(matrix)
    return _gauss_jordan_inverse(matrix)


def _spd_eliminate(augmented, n):
    """Gauss-Jordan without pivoting on [S | R] ([B, n, n + k], S positive definite):
    returns S^-1 R. Unrolled over a static n <= UNROLLED_INVERSE_MAX_ORDER (batched
    rank-one updates, which XLA fuses), else one step per column in a while_loop."""

    def step(k, augmented):
        pivot_row = tf.gather(augmented, k, axis=1)  # [B, n + k]
        pivot_row /= tf.gather(pivot_row, [k], axis=1)
        column = tf.gather(augmented, k, axis=2) - tf.one_hot(k, n, dtype=augmented.dtype)
        return augmented - column[:, :, None] * pivot_row[:, None, :]

    if isinstance(n, int) and n <= UNROLLED_INVERSE_MAX_ORDER:
        for k in range(n):
            augmented = step(k, augmented)
    else:
        augmented = tf.while_loop(
            lambda k, _: k < n, lambda k, a: (k + 1, step(k, a)), (tf.constant(0), augmented)
        )[1]
    return augmented[:, :, n:]


def spd_solve(matrix, rhs):
    """x with matrix x = rhs, for symmetric positive definite matrix [B, n, n], rhs [B, n].

    Gauss-Jordan elimination without pivoting, in every mode: for the few-dozen-row
    systems it is meant for (Anderson's least squares) it compiles to a handful of
    fused ops, where XLA's batched Cholesky is a slow scalar loop on CPU and
    `tf.linalg.solve` adds compile time. A singular or non-finite row gives a
    non-finite x in that row only, never an error.
    """
    n = matrix.shape[-1]
    if n is None:
        n = tf.shape(matrix)[-1]
    return _spd_eliminate(tf.concat([matrix, rhs[:, :, None]], axis=-1), n)[:, :, 0]


@tf.custom_gradient
def _gauss_jordan_inverse(matrix):
    n = matrix.shape[-1]
    eye = tf.eye(n, batch_shape=tf.shape(matrix)[:1], dtype=matrix.dtype)
    inverse = _spd_eliminate(tf.concat([matrix, eye], -1), n)

    def grad(upstream):  # d(M^-1) = -M^-1 dM M^-1
        return -tf.linalg.matmul(
            tf.linalg.matmul(inverse, upstream, transpose_a=True), inverse, transpose_b=True
        )

    return inverse, grad


def inverse(M):
    """Per-row inverse of a general M [B, n, n] (Gauss-Jordan with row pivoting under XLA).

    A singular row comes out non-finite, that row only (no kernel raises).
    """
    n = tf.shape(M)[-1]
    eye = tf.eye(n, batch_shape=tf.shape(M)[:1], dtype=M.dtype)
    if not in_xla_context():
        Qf, R = tf.linalg.qr(M)
        return tf.linalg.triangular_solve(R, tf.linalg.matrix_transpose(Qf), lower=False)
    return _eliminate(tf.concat([M, eye], axis=-1), n)[:, :, n:]


def smallest_pivot(S):
    """Per row, the smallest pivot of the LDL^T factorization (no pivoting) of S [B, n, n].

    S (symmetric) is positive definite exactly when every pivot is positive; once a
    pivot is not, the row's later pivots are not computed (their minimum is kept).
    An empty matrix (n = 0) gives +inf.
    """
    n = tf.shape(S)[-1]
    rows = tf.range(n)
    big = tf.fill(tf.shape(S)[:1], tf.constant(float("inf"), S.dtype))

    def step(j, A, low):
        col = tf.gather(A, j, axis=2)  # [B, n]
        d = tf.gather(col, j, axis=1)  # [B]
        ok = d > 0
        low = tf.minimum(low, d)
        safe = tf.where(ok, d, tf.ones_like(d))
        factors = tf.where((rows[None, :] > j) & ok[:, None], col / safe[:, None], 0.0)
        A = A - factors[:, :, None] * col[:, None, :]
        return j + 1, A, low

    _, _, low = tf.while_loop(lambda j, *_: j < n, step, (tf.constant(0), S, big))
    return low


def factor(M):
    """Factors of M [B, n, n] for `solve`: QR, or under XLA the explicit inverse.

    LU/Cholesky kernels raise on a singular row and kill the whole batch; QR and
    Gauss-Jordan never raise (a singular row yields inf/NaN there only, which callers
    flag).
    """
    if in_xla_context():
        return None, inverse(M)
    return tf.linalg.qr(M), None


def solve(factors, rhs, adjoint=False):
    """Solves M w = rhs (M^T w = rhs with `adjoint`) per row from `factor(M)`."""
    qr, inv = factors
    if inv is not None:
        return tf.linalg.matvec(inv, rhs, transpose_a=adjoint)
    Qf, R = qr
    if adjoint:  # M^T = R^T Qf^T
        v = tf.linalg.triangular_solve(R, rhs[..., None], lower=False, adjoint=True)
        return tf.linalg.matvec(Qf, v[..., 0])
    v = tf.linalg.triangular_solve(
        R, tf.linalg.matvec(Qf, rhs, transpose_a=True)[..., None], lower=False
    )
    return v[..., 0]
