"""Batched convex-program solvers behind the program layers.

`qp_admm`: OSQP-style ADMM for quadratic programs; `qp.solve_qp`: that solver as a
differentiable function (`ki.custom_root` on the KKT conditions). `cone`: COSMO-style
ADMM for cone programs, differentiable through `ki.custom_fixed_point`. `_admm`: the
status codes, norms and tolerances both share. Small batched factorizations that XLA
compiles well are in `keras_implicit._dense`. The Keras layers
(`ki.layers.QuadraticProgram`, `ConeProgram`, `CvxpyLayer`) are thin wrappers
(`keras_implicit.layers._program`).
"""
