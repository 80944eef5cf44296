"""Input checks and the design-matrix wrapper shared by solvers and hypergradients.

Everything is computed in float64: Lasso solutions are compared to scikit-learn at
1e-6 and hypergradients to finite differences at 1e-4, which float32 cannot deliver
on correlated designs.

`Design` hides three things from the solvers:
- dense (tf.Tensor) versus sparse (tf.SparseTensor for products, a scipy CSC copy for
  cheap column gathers) storage;
- implicit column centering (``X - 1 mu^T``) so that a sparse X stays sparse when the
  intercept is fitted (the same trick scikit-learn uses for sparse input);
- row subsets for cross-validation folds.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
import tensorflow as tf

DTYPE = tf.float64


def _is_tf_sparse(X) -> bool:
    return isinstance(X, tf.SparseTensor)


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"Input `{name}` contains NaN or infinity. Remove or impute those entries "
            "before fitting."
        )


def overflow_error(where: str, design=None, y=None) -> ValueError:
    """The error raised when float64 arithmetic on the data overflowed.

    ``where`` names the quantity found non-finite; the largest magnitudes of the data
    (computed only here, never on the fitting path) tell the user what to rescale."""
    sizes = []
    if design is not None:
        sizes.append(f"largest |X| = {design.max_abs():.3e}")
    if y is not None and np.size(y):
        sizes.append(f"largest |y| = {float(np.max(np.abs(y))):.3e}")
    detail = f" ({', '.join(sizes)})" if sizes else ""
    return ValueError(
        f"The solver's float64 arithmetic overflowed on this data: {where} is not finite. "
        f"The input data may contain values too large to fit{detail}; rescale X and y "
        "(e.g. standardize the columns of X) before fitting. No solution was computed."
    )


def _as_float64(values, name: str) -> np.ndarray:
    """A float64 numpy copy of real numeric data; complex, string and other
    non-numeric inputs are refused (numpy would drop imaginary parts or parse strings)."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`{name}` must be a real numeric array. Received: {name} of type "
            f"{type(values).__name__}"
        ) from err
    kind = array.dtype.kind
    if kind == "c":
        raise ValueError(
            f"`{name}` must be real: complex data is not supported. Received dtype {array.dtype}."
        )
    if kind not in "biufO":
        raise ValueError(f"`{name}` must be numeric. Received dtype {array.dtype}.")
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`{name}` must be a real numeric array. Received dtype {array.dtype} with "
            "entries that are not real numbers."
        ) from err


def as_design_input(X, name: str = "X"):
    """Returns ``X`` as a float64 numpy array or a float64 scipy CSC matrix."""
    if X is None:
        raise ValueError(f"`{name}` must be a 2-D array or sparse matrix. Received: {name}=None")
    if _is_tf_sparse(X):
        X = tf.sparse.reorder(X)
        indices = X.indices.numpy()
        shape = tuple(int(s) for s in X.dense_shape.numpy())
        if len(shape) != 2:
            raise ValueError(
                f"`{name}` must be 2-D (n_samples, n_features). Received shape {shape}."
            )
        values = _as_float64(X.values.numpy(), name)
        X = sp.csc_matrix((values, (indices[:, 0], indices[:, 1])), shape=shape)
    if sp.issparse(X):
        if X.dtype.kind not in "biuf":
            raise ValueError(
                f"`{name}` must be real numeric. Received a sparse matrix of dtype {X.dtype}."
            )
        X = sp.csc_matrix(X, dtype=np.float64)
        X.sum_duplicates()
        if X.ndim != 2:
            raise ValueError(f"`{name}` must be 2-D. Received shape {X.shape}.")
        _check_finite(name, X.data)
    else:
        if isinstance(X, tf.Tensor | tf.Variable):
            X = X.numpy()
        X = _as_float64(X, name)
        if X.ndim != 2:
            raise ValueError(
                f"`{name}` must be 2-D (n_samples, n_features). Received shape {X.shape}."
            )
        _check_finite(name, X)
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(
            f"`{name}` must have at least one sample and one feature. Received shape {X.shape}."
        )
    return X


def _target_array(y, name: str) -> np.ndarray:
    """``y`` as float64, a single column (n_samples, 1) made 1-D (as in scikit-learn)."""
    if isinstance(y, tf.Tensor | tf.Variable):
        y = y.numpy()
    y = _as_float64(y, name)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    return y


def _with_samples(y: np.ndarray, n_samples: int, name: str) -> np.ndarray:
    """``y`` after checking its number of samples and that it is finite."""
    if y.shape[0] != n_samples:
        raise ValueError(
            f"`X` and `{name}` have mismatched numbers of samples: X has {n_samples} rows, "
            f"{name} has {y.shape[0]} entries."
        )
    _check_finite(name, y)
    return y


def as_target(y, n_samples: int, name: str = "y") -> np.ndarray:
    """Returns ``y`` as a 1-D float64 array of length ``n_samples``."""
    y = _target_array(y, name)
    if y.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (n_samples,). Received shape {y.shape}.")
    return _with_samples(y, n_samples, name)


def as_targets(y, n_samples: int, name: str = "y") -> np.ndarray:
    """Returns ``y`` as float64 of shape (n_samples,) or (n_samples, n_targets).

    A single column (n_samples, 1) becomes 1-D, as in scikit-learn."""
    y = _target_array(y, name)
    if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
        raise ValueError(
            f"`{name}` must be 1-D (n_samples,) or 2-D (n_samples, n_targets). "
            f"Received shape {y.shape}."
        )
    return _with_samples(y, n_samples, name)


def as_sample_weight(sample_weight, n_samples: int, name: str = "sample_weight"):
    """``None``, or the weights as a 1-D float64 array of non-negative finite numbers
    with a positive sum."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, tf.Tensor | tf.Variable):
        sample_weight = sample_weight.numpy()
    w = _as_float64(sample_weight, name)
    if w.ndim == 0:
        w = np.full(n_samples, float(w))
    if w.shape != (n_samples,):
        raise ValueError(
            f"`{name}` must have one entry per sample ({n_samples}). Received shape {w.shape}."
        )
    _check_finite(name, w)
    if np.any(w < 0) or not np.sum(w) > 0:
        bad = float(w[np.argmin(w)]) if np.any(w < 0) else float(np.sum(w))
        raise ValueError(
            f"`{name}` must be non-negative with a positive sum. Received: "
            + (f"{name} entry {bad!r}" if np.any(w < 0) else f"sum({name})={bad!r}")
        )
    return w


def check_n_features(X, n_features: int, name: str = "X") -> None:
    if X.shape[1] != n_features:
        raise ValueError(
            f"`{name}` has {X.shape[1]} features but the model expects {n_features} "
            "(the number of features of the training data)."
        )


def labels_to_pm1(y: np.ndarray, classes: np.ndarray | None = None, name: str = "y"):
    """Maps two-class labels to -1/+1: the smaller label to -1, the larger to +1.

    With ``classes`` given (from a fitted model) the mapping of that model is used, so
    {0, 1} and {-1, 1} labels both work and validation labels must be known classes.
    """
    if classes is None:
        classes = np.unique(y)
        if classes.shape[0] != 2:
            raise ValueError(
                f"`{name}` must contain exactly two classes (e.g. {{-1, 1}} or {{0, 1}}). "
                f"Received classes: {classes.tolist()}"
            )
    unknown = ~np.isin(y, classes)
    if np.any(unknown):
        raise ValueError(
            f"`{name}` contains labels {np.unique(y[unknown]).tolist()} that are not among "
            f"the model classes {classes.tolist()}."
        )
    return np.where(y == classes[1], 1.0, -1.0), classes


class Design:
    """A design matrix, possibly sparse and implicitly column-centered.

    All products return float64 tf.Tensors. ``offset`` (length p) is subtracted from
    every column: ``Xc = X - u offset^T``, with ``u`` the vector ``row_scale`` (ones
    by default; the square roots of sample weights when the rows are weighted).
    """

    def __init__(self, X, offset: np.ndarray | None = None, row_scale=None):
        self.is_sparse = sp.issparse(X)
        self.n, self.p = X.shape
        # Host copy for column gathers: scipy CSC, or the transpose of a dense X in
        # C order, whose rows are X's columns (gathering 800 of 5000 columns took
        # 0.15-0.2 ms this way against 1.2 ms from a C-ordered X).
        self._np = X if self.is_sparse else np.ascontiguousarray(X.T)
        if self.is_sparse:
            coo = X.tocoo()
            indices = np.stack([coo.row, coo.col], axis=1).astype(np.int64)
            order = np.lexsort((indices[:, 1], indices[:, 0]))
            self._tf = tf.SparseTensor(indices[order], coo.data[order], dense_shape=X.shape)
        else:
            self._tf = tf.constant(X, dtype=DTYPE)
        self.offset = None if offset is None else np.asarray(offset, dtype=np.float64)
        self._offset_tf = None if offset is None else tf.constant(self.offset, dtype=DTYPE)
        self.row_scale = None if row_scale is None else np.asarray(row_scale, dtype=np.float64)
        self._row_scale_tf = None if row_scale is None else tf.constant(self.row_scale, DTYPE)
        self._col_sq_norms = None
        # The working-set solver's Gram block of its last working set (``_solver``).
        self.gram_cache = None

    # -- construction helpers -------------------------------------------------------
    @classmethod
    def from_input(cls, X, center: bool = False):
        X = as_design_input(X)
        return cls.centered(X) if center else cls(X)

    @classmethod
    def centered(cls, X, weights=None):
        """Centers dense X explicitly (faster products) and sparse X implicitly.

        With ``weights`` (non-negative, summing to n) the mean is the weighted mean
        and the rows are scaled by ``sqrt(weights)``: ``diag(sqrt w) (X - 1 mean^T)``.
        Returns ``(design, mean)``."""
        if weights is None:
            mean = np.asarray(X.mean(axis=0)).ravel()
            if sp.issparse(X):
                return cls(X, offset=mean), mean
            return cls(X - mean), mean
        mean = np.asarray(X.T @ weights).ravel() / X.shape[0]
        root = np.sqrt(weights)
        if sp.issparse(X):
            return cls(sp.csc_matrix(sp.diags(root) @ X), offset=mean, row_scale=root), mean
        return cls(root[:, None] * (X - mean)), mean

    @classmethod
    def row_scaled(cls, X, weights):
        """``diag(sqrt weights) X`` (uncentered weighted rows)."""
        root = np.sqrt(weights)
        if sp.issparse(X):
            return cls(sp.csc_matrix(sp.diags(root) @ X))
        return cls(root[:, None] * X)

    # -- products -------------------------------------------------------------------
    def matvec(self, coef) -> tf.Tensor:
        """Xc @ coef for a length-p vector."""
        coef = tf.convert_to_tensor(coef, dtype=DTYPE)
        if self.is_sparse:
            out = tf.sparse.sparse_dense_matmul(self._tf, coef[:, None])[:, 0]
        else:
            out = tf.linalg.matvec(self._tf, coef)
        if self._offset_tf is not None:
            shift = tf.tensordot(self._offset_tf, coef, 1)
            out = out - (shift if self._row_scale_tf is None else shift * self._row_scale_tf)
        return out

    def rmatvec(self, r) -> tf.Tensor:
        """Xc^T @ r for a length-n vector."""
        r = tf.convert_to_tensor(r, dtype=DTYPE)
        if self.is_sparse:
            out = tf.sparse.sparse_dense_matmul(self._tf, r[:, None], adjoint_a=True)[:, 0]
        else:
            out = tf.linalg.matvec(self._tf, r, transpose_a=True)
        if self._offset_tf is not None:
            total = (
                tf.reduce_sum(r)
                if self._row_scale_tf is None
                else tf.tensordot(self._row_scale_tf, r, 1)
            )
            out = out - self._offset_tf * total
        return out

    def columns(self, idx) -> tf.Tensor:
        """Dense (n, len(idx)) block of Xc."""
        return tf.transpose(self.columns_as_rows(idx))

    def columns_as_rows(self, idx) -> tf.Tensor:
        """Dense (len(idx), n) block ``Xc[:, idx]^T``: the gather without a transpose.

        Working sets gather hundreds of columns per solve; numpy's row gather of the
        stored transpose is ~6x faster than a column gather (numpy's or ``tf.gather``'s
        on axis 1), so products are written with this layout and transpose flags."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.is_sparse:
            block = tf.constant(self._np[:, idx].T.toarray(), dtype=DTYPE)
        else:
            block = tf.constant(self._np.take(idx, axis=0), dtype=DTYPE)
        if self.offset is not None:
            shift = tf.constant(self.offset[idx], dtype=DTYPE)[:, None]
            block = block - (shift if self._row_scale_tf is None else shift * self._row_scale_tf)
        return block

    def cross_gram(self, a, b) -> np.ndarray:
        """``Xc[:, a]^T Xc[:, b]`` as numpy.

        Computed by TensorFlow: numpy's BLAS alone is 2x faster on this product, but
        inside a solve its thread pool then contends with TensorFlow's (a chain of
        three warm solves takes 1.5x longer)."""
        return tf.matmul(self.columns_as_rows(a), self.columns_as_rows(b), transpose_b=True).numpy()

    def max_abs(self) -> float:
        """Largest magnitude of an entry of Xc (for error messages only)."""
        values = self._np.data if self.is_sparse else self._np
        largest = float(np.max(np.abs(values))) if values.size else 0.0
        if self.offset is not None and self.offset.size:
            largest = max(largest, float(np.max(np.abs(self.offset))))
        return largest

    def column_sq_norms(self) -> np.ndarray:
        """||Xc_j||^2 for every column (cached)."""
        if self._col_sq_norms is None:
            if self.is_sparse:
                sq = np.asarray(self._np.multiply(self._np).sum(axis=0)).ravel()
                if self.offset is not None:
                    u = np.ones(self.n) if self.row_scale is None else self.row_scale
                    s = np.asarray(self._np.T @ u).ravel()
                    sq = sq - 2 * self.offset * s + float(u @ u) * self.offset**2
            else:
                sq = tf.reduce_sum(tf.square(self._tf), axis=0).numpy()
            self._col_sq_norms = np.maximum(sq, 0.0)
        return self._col_sq_norms


def take_rows(X, idx):
    """Row subset of a numpy array or scipy matrix (kept in CSC for sparse input)."""
    idx = np.asarray(idx)
    if sp.issparse(X):
        return sp.csc_matrix(X.tocsr()[idx])
    return X[idx]


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
