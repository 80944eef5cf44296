"""Differentiable projections, cones and proximal operators (pure TensorFlow).

Vectors live along the last axis and every op is batched over the leading axes; all
run eagerly, in `tf.function` and under XLA (`jit_compile=True`) with a dynamic
batch size. Set parameters (radius, value, bounds, hyperplane vectors, penalty
strengths) may be Python numbers or tensors and receive gradients.

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
    prox_ridge,
)
from keras_implicit.ops.simplex import (
    projection_l1_ball,
    projection_l1_sphere,
    projection_simplex,
    sparsemax,
)

__all__ = [
    "projection_affine_set",
    "projection_box",
    "projection_exp_cone",
    "projection_halfspace",
    "projection_hyperplane",
    "projection_l1_ball",
    "projection_l1_sphere",
    "projection_l2_ball",
    "projection_l2_sphere",
    "projection_linf_ball",
    "projection_non_negative",
    "projection_psd_cone",
    "projection_second_order_cone",
    "projection_simplex",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_lasso",
    "prox_non_negative_lasso",
    "prox_ridge",
    "sparsemax",
]
