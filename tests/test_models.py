"""Model builders and function-preserving permutation."""

import numpy as np
from conftest import assert_close

from mtz_tf import models


def test_lenet_300_100_shapes():
    model = models.lenet_300_100()
    assert model.count_params() == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert model(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)


def test_permute_hidden_preserves_outputs_and_permutes_units(lenet_a, fashion):
    before = [w.copy() for w in lenet_a.get_weights()]
    permuted = models.permute_hidden(lenet_a, seed=5)
    x = fashion[2][:200]
    assert_close(permuted(x), lenet_a(x))
    kernel, permuted_kernel = (
        lenet_a.get_layer("fc1").kernel.numpy(),
        permuted.get_layer("fc1").kernel.numpy(),
    )
    assert not np.allclose(kernel, permuted_kernel)
    # Same columns, other order.
    np.testing.assert_allclose(np.sort(kernel.sum(0)), np.sort(permuted_kernel.sum(0)), rtol=1e-6)
    for original, now in zip(before, lenet_a.get_weights()):
        np.testing.assert_array_equal(original, now)  # input model untouched
    again = models.permute_hidden(lenet_a, seed=5)
    for a, b in zip(again.get_weights(), permuted.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_conv_builders_run():
    for model in (
        models.lenet5(),
        models.vgg16((28, 28, 1), 10, 0.125),
        models.resnet20((28, 28, 1), 5, 0.5),
    ):
        assert model(np.zeros((1, 28, 28, 1), np.float32)).shape[-1] in (5, 10)
