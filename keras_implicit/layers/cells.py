"""Cells for deep equilibrium layers: z_{k+1} = cell(z_k, x).

Every cell is an ordinary Keras layer called as `cell(z, x)`. The cells here also
implement a small optional protocol that `ki.layers.DEQ` uses to save work inside the
solver loop:

* `inject(x) -> context` (or `inject(x, training=None)`): everything that does not
  depend on z (the input injection; `MonotoneDenseCell`'s assembled W and step size;
  normalized kernels and dropout masks), computed ONCE per forward solve and reused
  by every solver iteration and by the backward pass;
* `step(z, context) -> z`: the map iterated by the solver;
* `state_shape(input_shape) -> tuple`: the shape of z (without the batch axis);
* `readout(state) -> output` (optional): applied to the solver's fixed point when the
  iterated state is an auxiliary variable (`MonotoneDenseCell`'s splitting state).

`cell(z, x)` is always `step(z, inject(x))`, so a cell without the protocol (any user
layer with `call(z, x)`) is treated exactly the same way, just less cheaply.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import _validation

__all__ = ["ConvCell", "DenseCell", "MonotoneDenseCell"]


class _Cell(keras.layers.Layer):
    """Shared plumbing: `call(z, x) = step(z, inject(x))` and shape checks."""

    def inject(self, x):
        raise NotImplementedError

    def step(self, z, context):
        raise NotImplementedError

    def state_shape(self, input_shape):
        raise NotImplementedError

    def call(self, z, x):
        return self.step(z, self.inject(x))

    def compute_output_shape(self, z_shape, x_shape):
        return tuple(z_shape)

    def _check_state(self, z_shape, x_shape):
        expected = tuple(self.state_shape(tuple(x_shape)))
        received = tuple(z_shape)[1:]
        if len(received) != len(expected) or any(
            r is not None and r != e for r, e in zip(received, expected)
        ):
            raise ValueError(
                f"{type(self).__name__} '{self.name}' maps inputs of shape {tuple(x_shape)} to "
                f"states of shape (batch, *{expected}). Received: z shape {tuple(z_shape)}"
            )


def _check_dropout(rate):
    rate = _validation.float_in_range("dropout", rate, 0.0, 1.0)
    if rate == 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={rate!r}")
    return rate


def _unit(v, axis=None):
    return v / tf.maximum(tf.norm(v, axis=axis, keepdims=axis is not None), 1e-12)


@keras.saving.register_keras_serializable(package="keras_implicit")
class DenseCell(_Cell):
    """Weight-tied MLP cell with input injection and normalization (for vectors).

        h = activation(z W1 + b1)
        z_next = norm_out(activation(norm_in(h W2 + x U + b2)))

    The normalizations keep the map's scale fixed, and z enters only through the
    small-initialized two-layer path (`kernel_scale`), so the map starts as a
    contraction dominated by the injection x U, and Anderson converges in a few tens
    of iterations. There is no z skip connection: it makes the map's Jacobian close to
    a scaled identity, whose eigenvalues training can push past 1.

    Everything that does not depend on z is computed once per forward solve in
    `inject` and reused by every solver iteration and by the backward pass: the
    injection x U, the normalized kernels (`kernel_norm`) and the dropout mask.

    Args:
        units: width of the state z.
        hidden_units: width of h (default: `units`).
        activation: Keras activation name or callable.
        normalization: "layer" (LayerNormalization, default) or "none".
        kernel_scale: standard deviation (times 1/sqrt(fan_in)) of the initial W1, W2.
        kernel_norm: None (default), "weight" or "spectral": reparametrize W1 and W2
            as g * V / ||V|| (per output unit, with a trainable g initialized to the
            initial norms: weight normalization) or as W / sigma(W) (spectral
            normalization, sigma estimated by power iteration).
        power_iterations: power iterations per training call (spectral norm). The
            vectors are non-trainable weights updated once per training forward pass;
            inference uses them as they are.
        dropout: rate of variational dropout on h: one mask per sample and solve,
            drawn in `inject` (training only), so every iteration and the backward
            pass see the same mask (scaled by 1 / (1 - rate)). 0 disables it.
        seed: seed of the dropout masks.
    """

    def __init__(
        self,
        units,
        hidden_units=None,
        activation="relu",
        normalization="layer",
        kernel_scale=0.5,
        kernel_norm=None,
        power_iterations=1,
        dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _validation.positive_int("units", units)
        self.hidden_units = _validation.positive_int(
            "hidden_units", self.units if hidden_units is None else hidden_units
        )
        self.activation = keras.activations.get(activation)
        self.normalization = _validation.one_of("normalization", normalization, ("layer", "none"))
        self.kernel_scale = _validation.float_in_open_range("kernel_scale", kernel_scale, 0.0, 10.0)
        if kernel_norm is not None:
            _validation.one_of("kernel_norm", kernel_norm, ("weight", "spectral"))
        self.kernel_norm = kernel_norm
        self.power_iterations = _validation.positive_int("power_iterations", power_iterations)
        self.dropout = _check_dropout(dropout)
        self.seed = seed
        if self.dropout:
            self.seed_generator = keras.random.SeedGenerator(seed, name="dropout_seed")
        init = keras.initializers.VarianceScaling(self.kernel_scale**2, "fan_in", "normal")
        self.hidden = keras.layers.Dense(
            self.hidden_units, kernel_initializer=init, name="hidden", dtype=self.dtype_policy
        )
        self.recurrent = keras.layers.Dense(
            self.units,
            kernel_initializer=init,
            use_bias=False,
            name="recurrent",
            dtype=self.dtype_policy,
        )
        self.injection = keras.layers.Dense(self.units, name="injection", dtype=self.dtype_policy)
        if self.normalization == "layer":
            self.norm_in = keras.layers.LayerNormalization(name="norm_in", dtype=self.dtype_policy)
            self.norm_out = keras.layers.LayerNormalization(
                name="norm_out", dtype=self.dtype_policy
            )
        else:
            self.norm_in = self.norm_out = None

    def state_shape(self, input_shape):
        return (self.units,)

    def build(self, z_shape, x_shape):
        if len(x_shape) != 2:
            raise ValueError(
                f"DenseCell expects inputs of shape (batch, features). Received: x shape "
                f"{tuple(x_shape)}"
            )
        self._check_state(z_shape, x_shape)
        self.injection.build(x_shape)
        self.hidden.build(z_shape)
        self.recurrent.build((z_shape[0], self.hidden_units))
        if self.norm_in is not None:
            self.norm_in.build(z_shape)
            self.norm_out.build(z_shape)
        self._norm_weights = []
        for layer in (self.hidden, self.recurrent):
            if self.kernel_norm is not None:
                self._norm_weights.append(self._add_norm_weight(layer))

    def _add_norm_weight(self, layer):
        """g (weight norm, initialized to the kernel's column norms) or the power vector u."""
        kernel = tf.convert_to_tensor(layer.kernel)
        if self.kernel_norm == "weight":
            norms = tf.norm(kernel, axis=0)
            return self.add_weight(
                shape=(kernel.shape[1],),
                initializer=lambda shape, dtype=None: tf.cast(norms, dtype or "float32"),
                name=f"{layer.name}_g",
                autocast=False,
            )
        return self.add_weight(
            shape=(kernel.shape[1],),
            initializer=lambda shape, dtype=None: _unit(tf.random.normal(shape, dtype=dtype)),
            name=f"{layer.name}_u",
            trainable=False,
            autocast=False,
        )

    def normalized_kernels(self, training=None):
        """(W1, W2) after `kernel_norm`, in the variable dtype; with the spectral norm
        in training, the power vectors are advanced `power_iterations` steps (assigned)."""
        kernels = []
        for layer, weight in zip((self.hidden, self.recurrent), self._norm_weights):
            kernel = tf.cast(tf.convert_to_tensor(layer.kernel), weight.dtype)
            if self.kernel_norm == "weight":
                kernels.append(tf.convert_to_tensor(weight) * _unit(kernel, axis=0))
                continue
            frozen = tf.stop_gradient(kernel)
            u = tf.convert_to_tensor(weight)
            if training:
                for _ in range(self.power_iterations):
                    u = _unit(tf.linalg.matvec(frozen, _unit(tf.linalg.matvec(frozen, u)), True))
                weight.assign(u)
            v = _unit(tf.linalg.matvec(frozen, u))
            sigma = tf.tensordot(v, tf.linalg.matvec(kernel, u), 1)
            kernels.append(kernel / sigma)
        return kernels

    def _dropout_mask(self, like):
        keep = 1.0 - self.dropout
        shape = tf.stack([tf.shape(like)[0], self.hidden_units])
        draw = keras.random.uniform(shape, dtype=like.dtype, seed=self.seed_generator)
        return tf.cast(draw < keep, like.dtype) / tf.cast(keep, like.dtype)

    def inject(self, x, training=None):
        u = self.injection(x)
        drop = bool(self.dropout) and bool(training)
        if self.kernel_norm is None and not drop:
            return u
        if self.kernel_norm is None:
            kernels = [
                tf.convert_to_tensor(self.hidden.kernel),
                tf.convert_to_tensor(self.recurrent.kernel),
            ]
        else:
            kernels = self.normalized_kernels(training)
        mask = self._dropout_mask(u) if drop else tf.ones([], u.dtype)
        return (u, *kernels, mask)

    def step(self, z, context):
        with tf.name_scope("dense_cell"):
            if isinstance(context, (tuple, list)):
                u, kernel1, kernel2, mask = context
                z = tf.cast(z, u.dtype)
                bias = tf.cast(self.hidden.bias, u.dtype)
                h = self.activation(tf.matmul(z, tf.cast(kernel1, u.dtype)) + bias) * mask
                pre = tf.matmul(h, tf.cast(kernel2, u.dtype)) + u
            else:
                h = self.activation(self.hidden(z))
                pre = self.recurrent(h) + context
            if self.norm_in is not None:
                pre = self.norm_in(pre)
            out = self.activation(pre)
            return self.norm_out(out) if self.norm_out is not None else out

    def call(self, z, x, training=None):
        return self.step(z, self.inject(x, training=training))

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "hidden_units": self.hidden_units,
            "activation": keras.activations.serialize(self.activation),
            "normalization": self.normalization,
            "kernel_scale": self.kernel_scale,
            "kernel_norm": self.kernel_norm,
            "power_iterations": self.power_iterations,
            "dropout": self.dropout,
            "seed": self.seed,
        }


def _conv_frequency_tables(grid, kernel_size):
    """cos and sin of the 2-D DFT phases, (grid * grid, kernel_size**2) each (numpy)."""
    freqs = 2.0 * np.pi * np.arange(grid) / grid
    offsets = np.arange(kernel_size)
    # phase[f1, f2, p1, p2] = w1 p1 + w2 p2
    phase = (
        freqs[:, None, None, None] * offsets[None, None, :, None]
        + freqs[None, :, None, None] * offsets[None, None, None, :]
    ).reshape(grid * grid, kernel_size * kernel_size)
    return np.cos(phase), np.sin(phase)


def conv_operator_norm(kernel, grid):
    """Spectral norm of the circular convolution with `kernel` on a grid x grid torus.

    The "same"-padded convolution on an H x W image is the circular one on a
    grid >= max(H, W) + kernel_size - 1 torus restricted to the image (zero-embed,
    convolve, crop: both norm <= 1), so this is an upper bound of its norm. The circular
    convolution is diagonalized by the DFT: its norm is the largest singular value of
    K(w) = sum_p K_p exp(-i w.p) over the grid's frequencies w, computed here in real
    arithmetic ([[Re, -Im], [Im, Re]] has the singular values of Re + i Im) in float32
    (float64 for a float64 kernel), differentiably.
    """
    size = kernel.shape[0]
    dtype = tf.float64 if kernel.dtype == tf.float64 else tf.float32
    kernel = tf.cast(kernel, dtype)
    cin, cout = kernel.shape[2], kernel.shape[3]
    cos, sin = _conv_frequency_tables(grid, size)
    flat = tf.reshape(kernel, [size * size, cin * cout])
    real = tf.reshape(tf.matmul(tf.constant(cos, dtype), flat), [-1, cin, cout])
    imag = tf.reshape(tf.matmul(tf.constant(-sin, dtype), flat), [-1, cin, cout])
    block = tf.concat(
        [tf.concat([real, -imag], axis=-1), tf.concat([imag, real], axis=-1)], axis=-2
    )
    if cin <= cout:
        gram = tf.matmul(block, block, transpose_b=True)
    else:
        gram = tf.matmul(block, block, transpose_a=True)
    top = tf.reduce_max(tf.linalg.eigvalsh(gram))
    return tf.sqrt(tf.maximum(top, tf.zeros_like(top)))


@keras.saving.register_keras_serializable(package="keras_implicit")
class ConvCell(_Cell):
    """Convolutional cell whose map is a contraction in z by construction.

        c = GN_in(conv_in(x))                                  (once per forward pass)
        z_next = activation(c + skip * z + conv2(activation(conv1(z))))
        output = GN_out(z*)                                    (`readout`)

    z has the spatial shape of x and `filters` channels ("same" padding). Before each
    forward pass conv1 and conv2 are rescaled (only when needed) so that the norm of
    each, as an operator on the state's spatial grid (`conv_operator_norm`, an exact
    bound), is at most sqrt(lipschitz - skip). For a 1-Lipschitz activation (relu, the
    default; also tanh, sigmoid, elu) the map is then a contraction with constant
    `lipschitz` for every value of the weights: z* exists and is unique, every
    eigenvalue of d cell / dz has modulus <= lipschitz, and the implicit backward system
    (I - J^T) u = g amplifies a gradient by at most 1 / (1 - lipschitz).

    Why: with normalizations inside the map (the MDEQ form, z_next = GN(relu(z +
    GN(conv(relu(conv(z))) + conv_in(x))))) the z-path has no bound, and training can
    push a real eigenvalue of d cell / dz through 1, where the solve and the implicit
    gradient fail. Here the normalizations touch only x (`GN_in`) and the fixed point
    (`GN_out`, outside the solver loop), so they cannot break the bound.

    Args:
        filters: channels of the state z.
        hidden_filters: channels of conv1's output (default: `filters`).
        kernel_size: odd size of the two state convolutions.
        groups: GroupNormalization groups of GN_in and GN_out (must divide filters).
            Default: the largest divisor of filters and hidden_filters that is at most
            4 (4 for 16 filters, 3 for 3, 1 for 5).
        activation: Keras activation (1-Lipschitz for the bound to hold).
        kernel_scale: as `DenseCell`: scale of the initial state-path conv kernels.
        lipschitz: the bound of the map's Lipschitz constant in z, in (0, 1).
        skip: weight of the identity path, in [0, lipschitz).
        dropout: rate of variational dropout on conv1's output channels: one mask per
            sample and solve (shared by every pixel, iteration and the backward pass),
            drawn in `inject` in training. Kept channels are not rescaled in training;
            at inference the channels are scaled by 1 - rate instead (the expected
            mask), so the map stays a `lipschitz`-contraction in both modes.
        seed: seed of the dropout masks.
    """

    def __init__(
        self,
        filters,
        hidden_filters=None,
        kernel_size=3,
        groups=None,
        activation="relu",
        kernel_scale=1.0,
        lipschitz=0.9,
        skip=0.5,
        dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dropout = _check_dropout(dropout)
        self.seed = seed
        if self.dropout:
            self.seed_generator = keras.random.SeedGenerator(seed, name="dropout_seed")
        self.filters = _validation.positive_int("filters", filters)
        self.hidden_filters = _validation.positive_int(
            "hidden_filters", self.filters if hidden_filters is None else hidden_filters
        )
        self.kernel_size = _validation.positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd. Received: kernel_size={kernel_size!r}")
        if groups is None:
            common = math.gcd(self.filters, self.hidden_filters)
            groups = max(g for g in range(1, 5) if common % g == 0)
        self.groups = _validation.positive_int("groups", groups)
        if self.filters % self.groups:
            raise ValueError(
                f"`groups` must divide `filters`. Received: groups={groups!r}, "
                f"filters={self.filters!r}"
            )
        self.activation = keras.activations.get(activation)
        self.kernel_scale = _validation.float_in_open_range("kernel_scale", kernel_scale, 0.0, 10.0)
        self.lipschitz = _validation.float_in_open_range("lipschitz", lipschitz, 0.0, 1.0)
        ok = isinstance(skip, numbers.Real) and not isinstance(skip, bool)
        if not (ok and 0.0 <= skip < self.lipschitz):
            raise ValueError(
                f"`skip` must be in [0, lipschitz={self.lipschitz}). Received: skip={skip!r}"
            )
        self.skip = float(skip)
        init = keras.initializers.VarianceScaling(self.kernel_scale**2, "fan_in", "normal")

        def conv(filters, size, name, use_bias=False, initializer=init):
            return keras.layers.Conv2D(
                filters,
                size,
                padding="same",
                use_bias=use_bias,
                kernel_initializer=initializer,
                name=name,
                dtype=self.dtype_policy,
            )

        self.conv1 = conv(self.hidden_filters, self.kernel_size, "conv1")
        self.conv2 = conv(self.filters, self.kernel_size, "conv2")
        self.conv_in = conv(self.filters, self.kernel_size, "conv_in", True, "glorot_uniform")
        self.norm_in = keras.layers.GroupNormalization(
            self.groups, name="norm_in", dtype=self.dtype_policy
        )
        self.norm_out = keras.layers.GroupNormalization(
            self.groups, name="norm_out", dtype=self.dtype_policy
        )

    def state_shape(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "ConvCell expects inputs of shape (batch, height, width, channels). "
                f"Received: x shape {tuple(input_shape)}"
            )
        return (input_shape[1], input_shape[2], self.filters)

    def build(self, z_shape, x_shape):
        self._check_state(z_shape, x_shape)
        self.conv_in.build(x_shape)
        self.conv1.build(z_shape)
        hidden_shape = (*z_shape[:-1], self.hidden_filters)
        self.conv2.build(hidden_shape)
        self.norm_in.build(z_shape)
        self.norm_out.build(z_shape)
        # the torus on which the operator norms are exact upper bounds (see
        # `conv_operator_norm`); unknown spatial sizes: a 32 x 32 grid, which samples
        # the frequency response finely enough to be within about 1% of its maximum
        spatial = [s for s in z_shape[1:3] if s is not None]
        side = max(spatial) if len(spatial) == 2 else 30
        self._grid = side + self.kernel_size - 1

    def state_kernels(self):
        """conv1's and conv2's kernels, rescaled to operator norm <= sqrt(lipschitz - skip)."""
        bound = (self.lipschitz - self.skip) ** 0.5
        kernels = []
        for conv in (self.conv1, self.conv2):
            kernel = tf.convert_to_tensor(conv.kernel)
            norm = conv_operator_norm(kernel, self._grid)
            scale = tf.minimum(tf.ones_like(norm), bound / tf.maximum(norm, 1e-12))
            kernels.append(kernel * tf.cast(scale, kernel.dtype))
        return kernels

    def inject(self, x, training=None):
        c = self.norm_in(self.conv_in(x))
        kernel1, kernel2 = self.state_kernels()
        keep = 1.0 - self.dropout
        if self.dropout and training:
            shape = tf.stack([tf.shape(c)[0], 1, 1, self.hidden_filters])
            draw = keras.random.uniform(shape, dtype=c.dtype, seed=self.seed_generator)
            mask = tf.cast(draw < keep, c.dtype)
        else:
            mask = tf.constant(keep, c.dtype)
        return c, tf.cast(kernel1, c.dtype), tf.cast(kernel2, c.dtype), mask

    def readout(self, z):
        return self.norm_out(z)

    def step(self, z, context):
        c, kernel1, kernel2, mask = context
        with tf.name_scope("conv_cell"):
            kernel1, kernel2 = tf.cast(kernel1, z.dtype), tf.cast(kernel2, z.dtype)
            h = self.activation(tf.nn.conv2d(z, kernel1, 1, "SAME"))
            if self.dropout:
                h = h * tf.cast(mask, z.dtype)
            pre = tf.cast(c, z.dtype) + tf.nn.conv2d(h, kernel2, 1, "SAME")
            if self.skip:
                pre = pre + self.skip * z
            return self.activation(pre)

    def call(self, z, x, training=None):
        # the map iterated by DEQ (without the readout)
        return self.step(z, self.inject(x, training=training))

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "hidden_filters": self.hidden_filters,
            "kernel_size": self.kernel_size,
            "groups": self.groups,
            "activation": keras.activations.serialize(self.activation),
            "kernel_scale": self.kernel_scale,
            "lipschitz": self.lipschitz,
            "skip": self.skip,
            "dropout": self.dropout,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_implicit")
class MonotoneDenseCell(_Cell):
    """Monotone operator equilibrium cell (monDEQ, Winston & Kolter 2020).

    The equilibrium is z* = relu(W z* + U x + b) with

        W = (1 - m) I - A^T A + B - B^T,

    so that G = I - W = m I + A^T A - (B - B^T) is strongly monotone with constant m
    for every value of A, B: the equilibrium exists, is unique, and the implicit system
    is invertible (the nonsmooth implicit function theorem's condition) by
    construction, whatever training does to the weights.

    Plain iteration of relu(W z + U x + b) need not converge, so the solver iterates
    Peaceman-Rachford splitting instead, on an auxiliary state v (this cell's state,
    `state_shape`), with relu = the resolvent of the nonnegative orthant's normal cone
    and R = (I + alpha G)^{-1} the resolvent of the linear part:

        T(v) = 2 R(2 relu(v) - v + alpha (U x + b)) - (2 relu(v) - v)
        z = relu(v)                                  (`readout`, applied by DEQ)

    T = C_G o C_F is a composition of Cayley operators: C_F is nonexpansive and C_G
    a contraction because G is strongly monotone, so T converges (factor
    sqrt(1 - 4 alpha m / (1 + alpha L)^2), L = ||G||_2), and relu(v*) is the
    equilibrium for every alpha > 0. alpha = 1 / L minimizes that bound; it is
    recomputed from the current weights at each forward pass (`inject`, an exact
    symmetric eigenvalue solve) and treated as a constant in the gradient: z* does
    not depend on alpha, so the implicit gradient of relu(v*) is exact.

    `DEQ(MonotoneDenseCell(n))` returns z* (the readout), shape (batch, n).

    Args:
        units: width of the state z.
        monotonicity: m in (0, 1).
        alpha: a fixed splitting step size > 0 instead of the automatic 1 / L (None).
    """

    def __init__(self, units, monotonicity=0.1, alpha=None, **kwargs):
        super().__init__(**kwargs)
        self.units = _validation.positive_int("units", units)
        self.monotonicity = _validation.float_in_open_range("monotonicity", monotonicity, 0.0, 1.0)
        self.alpha = (
            None
            if alpha is None
            else _validation.float_in_open_range("alpha", alpha, 0.0, float("inf"))
        )
        self.injection = keras.layers.Dense(self.units, name="injection", dtype=self.dtype_policy)

    def state_shape(self, input_shape):
        return (self.units,)

    def build(self, z_shape, x_shape):
        if len(x_shape) != 2:
            raise ValueError(
                "MonotoneDenseCell expects inputs of shape (batch, features). Received: "
                f"x shape {tuple(x_shape)}"
            )
        self._check_state(z_shape, x_shape)
        self.injection.build(x_shape)
        init = keras.initializers.RandomNormal(stddev=0.5 / self.units**0.5)
        # not autocast: W, its eigenvalues and the resolvent are computed in the variable
        # dtype (float32 under a mixed policy; half-precision eigensolvers do not exist)
        self.a = self.add_weight(
            shape=(self.units, self.units), initializer=init, name="a", autocast=False
        )
        self.b = self.add_weight(
            shape=(self.units, self.units), initializer=init, name="b", autocast=False
        )

    def w_matrix(self):
        """W = (1 - m) I - A^T A + B - B^T."""
        a, b = tf.convert_to_tensor(self.a), tf.convert_to_tensor(self.b)
        eye = tf.eye(self.units, dtype=a.dtype)
        gram = tf.matmul(a, a, transpose_a=True)
        return (1.0 - self.monotonicity) * eye - gram + b - tf.transpose(b)

    def step_size(self, g):
        """alpha = 1 / ||G||_2 (or the fixed `alpha`), without gradient."""
        if self.alpha is not None:
            return tf.constant(self.alpha, g.dtype)
        g = tf.stop_gradient(g)
        lipschitz_sq = tf.reduce_max(tf.linalg.eigvalsh(tf.matmul(g, g, transpose_a=True)))
        return 1.0 / tf.sqrt(lipschitz_sq)

    def inject(self, x):
        u = self.injection(x)
        w = self.w_matrix()
        eye = tf.eye(self.units, dtype=w.dtype)
        g = eye - w
        alpha = self.step_size(g)
        # rows times R^T: r = v (I + alpha G)^{-T}; solved once per forward pass
        resolvent_t = tf.transpose(tf.linalg.solve(eye + alpha * g, eye))
        return tf.cast(alpha, u.dtype) * u, tf.cast(resolvent_t, u.dtype)

    def readout(self, v):
        return tf.nn.relu(v)

    def step(self, v, context):
        scaled_u, resolvent_t = context
        with tf.name_scope("monotone_cell"):
            reflected = 2.0 * tf.nn.relu(v) - v  # C_F(v)
            return 2.0 * tf.matmul(reflected + scaled_u, resolvent_t) - reflected  # C_G

    def call(self, z, x):
        # the splitting map on the auxiliary state (what DEQ iterates)
        return self.step(z, self.inject(x))

    def equilibrium_residual(self, z, x):
        """||z - relu(W z + U x + b)|| per row: zero exactly at the monDEQ equilibrium."""
        z = tf.convert_to_tensor(z)
        w = tf.cast(self.w_matrix(), z.dtype)
        target = tf.nn.relu(tf.matmul(z, w, transpose_b=True) + self.injection(x))
        return tf.norm(z - target, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "monotonicity": self.monotonicity,
            "alpha": self.alpha,
        }
