"""Keras layers: projections (and, from other modules, DEQ cells and convex programs)."""

from keras_implicit.layers.cells import ConvCell, DenseCell, MonotoneDenseCell
from keras_implicit.layers.cone_program import ConeProgram
from keras_implicit.layers.cvxpy_layer import CvxpyLayer
from keras_implicit.layers.deq import DEQ
from keras_implicit.layers.projection import (
    AffineSetProjection,
    BoxProjection,
    ExpConeProjection,
    HalfspaceProjection,
    HyperplaneProjection,
    L1BallProjection,
    L1SphereProjection,
    L2BallProjection,
    L2SphereProjection,
    LinfBallProjection,
    NonNegativeProjection,
    Projection,
    PSDProjection,
    SimplexProjection,
    SOCProjection,
    Sparsemax,
)
from keras_implicit.layers.qp import QuadraticProgram

__all__ = [
    "DEQ",
    "AffineSetProjection",
    "BoxProjection",
    "ConeProgram",
    "ConvCell",
    "CvxpyLayer",
    "DenseCell",
    "ExpConeProjection",
    "HalfspaceProjection",
    "HyperplaneProjection",
    "L1BallProjection",
    "L1SphereProjection",
    "L2BallProjection",
    "L2SphereProjection",
    "LinfBallProjection",
    "MonotoneDenseCell",
    "NonNegativeProjection",
    "PSDProjection",
    "Projection",
    "QuadraticProgram",
    "SOCProjection",
    "SimplexProjection",
    "Sparsemax",
]
