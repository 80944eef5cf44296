"""Exceptions and warnings raised when an implicit computation cannot be trusted."""


class ConvergenceError(RuntimeError):
    """A forward solver or a backward linear solve failed under `on_failure="raise"`."""


class ConvergenceWarning(RuntimeWarning):
    """A forward solver or a backward linear solve failed under `on_failure="warn"`."""
