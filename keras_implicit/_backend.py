"""Pins Keras to the TensorFlow backend before anything imports keras."""

import os

_REQUIRED = "tensorflow"
_requested = os.environ.setdefault("KERAS_BACKEND", _REQUIRED)
if _requested != _REQUIRED:
    raise ImportError(
        "keras_implicit runs on the TensorFlow backend of Keras only. "
        f"Received: KERAS_BACKEND={_requested!r}. Unset it or set KERAS_BACKEND=tensorflow."
    )

import keras  # noqa: E402

if keras.backend.backend() != _REQUIRED:
    raise ImportError(
        "keras_implicit runs on the TensorFlow backend of Keras only, but keras was "
        f"already imported with backend {keras.backend.backend()!r}."
    )
