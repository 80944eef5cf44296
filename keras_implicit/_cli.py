"""Quiet start-up for `python -m keras_implicit` (never used on plain import)."""

import itertools
import os
import sys


def running_as_cli() -> bool:
    """True when the interpreter was started as `python ... -m keras_implicit`.

    Python imports the package (and with it TensorFlow) before running __main__, so the
    CLI must be recognized here, from the interpreter's original arguments.
    """
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b == "keras_implicit" for a, b in itertools.pairwise(argv))


def silence_native_stderr() -> None:
    """Sends file descriptor 2 to /dev/null but keeps Python's stderr on the terminal.

    TensorFlow's C++ libraries log to descriptor 2 whenever they initialize something
    (CUDA probing, CPU features, XLA), ignoring TF_CPP_MIN_LOG_LEVEL. Python's own
    messages (warnings, tracebacks, argparse errors) go through a duplicate of it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    terminal = os.dup(2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
