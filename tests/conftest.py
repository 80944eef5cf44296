import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
import tensorflow as tf

# The three execution modes every public op must support.
MODES = ("eager", "function", "xla")


def run_in_mode(fn, mode):
    """Wraps `fn` for `mode`: plain Python, `tf.function`, or `tf.function(jit_compile=True)`."""
    if mode == "eager":
        return fn
    if mode == "function":
        return tf.function(fn, reduce_retracing=True)
    if mode == "xla":
        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    raise ValueError(mode)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seeded_keras():
    """Each test starts from the same Keras/TF/numpy seeds, so weight initializers and
    shuffles do not change from one run (or one machine) to the next."""
    keras.utils.set_random_seed(0)
