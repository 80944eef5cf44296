"""A fixture that runs a test under both device branches of the ops.

Some ops choose a code path by device (`keras_implicit.ops._common.sum_last`: a
matrix product with ones on CPU, a reduction where a GPU or TPU is visible). The
private override `_common._device_branch_override` forces either branch on a CPU,
so both run in the tests. Import the fixture into a test module to use it.
"""

import pytest

BRANCHES = ("cpu", "accelerator")


@pytest.fixture(params=BRANCHES)
def device_branch(request, monkeypatch):
    from keras_implicit.ops import _common

    monkeypatch.setattr(_common, "_device_branch_override", request.param)
    return request.param
