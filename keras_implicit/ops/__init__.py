"""Differentiable projections, cones and proximal operators (pure TensorFlow).

Vectors live along the last axis and every op is batched over the leading axes; all
run eagerly, in `tf.function` and under XLA (`jit_compile=True`) with a dynamic
batch size. Set parameters (radius, value, bounds, hyperplane vectors, penalty
strengths) may be Python numbers or tensors and receive gradients.

Scale: every projection is accurate to a few ulps of its dtype at any magnitude of
`x` and of its parameters that the dtype represents, tested from 1e-30 to 1e30 in
float32 and float64 (values and Jacobians) and near float32's largest value. Norms
and eigensolvers work on data rescaled by a power of two (no squares that overflow
at 1e20 or underflow at 1e-20 in float32), and the simplex family solves for
max(x) - tau on x - max(x), so a value of 1 next to |x| ~ 1e9 is still exact. Two
limits are the dtype's own: TF's CPU kernels flush subnormal numbers (below 1.2e-38
in float32, 2.2e-308 in float64) to zero, and a projection whose entries exceed the
largest float is inf. float16/bfloat16 inputs are computed in float32 and returned
in their dtype. A row with a NaN entry returns NaN; the row-coupled ops (simplex
family, l2 ball/sphere, PSD and exponential cones) also return a NaN row for an
infinite entry. No bad row changes the other rows' outputs or gradients.

The scale statement above covers the closed-form ops and the exact searches (simplex
family, sparse simplex, cones). The box section is exact too (tested for scale
invariance from 1e-12 to 1e12). The transport and Birkhoff projections are solved to
a tolerance (`tol`) with implicit gradients through `keras_implicit.custom_root`,
and `projection_polyhedron` runs the `QuadraticProgram` layer (ADMM with
polishing): their accuracy is the solver's, reported under `on_failure`.

Device branches: a few ops choose a kernel by device (`_common.sum_last`: a product
with ones on CPU, a reduction on GPU/TPU, where float32 products run in reduced
precision). `KERAS_IMPLICIT_DEVICE_BRANCH=accelerator` (or `cpu`, default `auto`),
read once per process, forces a branch; the tests run both.

At kinks each op returns one documented element of the Clarke Jacobian: a
constraint that holds with equality is treated as active (relu'(0) = 0, a point on
the boundary of a ball uses the radial formula, a simplex coordinate equal to the
threshold is outside the support, a zero eigenvalue is clipped).
"""

from keras_implicit.ops.cones import (
    projection_exp_cone,
    projection_psd_cone,
    projection_second_order_cone,
)
from keras_implicit.ops.polyhedra import projection_box_section, projection_polyhedron
from keras_implicit.ops.projections import (
    projection_affine_set,
    projection_box,
    projection_halfspace,
    projection_hyperplane,
    projection_l2_ball,
    projection_l2_sphere,
    projection_linf_ball,
    projection_non_negative,
)
from keras_implicit.ops.prox import (
    prox_elastic_net,
    prox_group_lasso,
    prox_lasso,
    prox_non_negative_lasso,
    prox_non_negative_ridge,
    prox_ridge,
)
from keras_implicit.ops.simplex import (
    projection_l1_ball,
    projection_l1_sphere,
    projection_simplex,
    projection_sparse_simplex,
    sparsemax,
)
from keras_implicit.ops.transport import projection_birkhoff, projection_transport

__all__ = [
    "projection_affine_set",
    "projection_birkhoff",
    "projection_box",
    "projection_box_section",
    "projection_exp_cone",
    "projection_halfspace",
    "projection_hyperplane",
    "projection_l1_ball",
    "projection_l1_sphere",
    "projection_l2_ball",
    "projection_l2_sphere",
    "projection_linf_ball",
    "projection_non_negative",
    "projection_polyhedron",
    "projection_psd_cone",
    "projection_second_order_cone",
    "projection_simplex",
    "projection_sparse_simplex",
    "projection_transport",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_lasso",
    "prox_non_negative_lasso",
    "prox_non_negative_ridge",
    "prox_ridge",
    "sparsemax",
]
