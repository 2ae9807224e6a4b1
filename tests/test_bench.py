"""The arithmetic behind the benchmark tables (the timings themselves are not tested)."""

from gradfuse.bench import Measurement, mlp_train_flops, render


def test_training_flops_count_forward_weight_and_input_gradients():
    # 3-4-2 at batch 5: forward 2·5·(3·4 + 4·2) = 200, weight gradients 200, ∂L/∂h of the
    # second layer's input 2·5·4·2 = 80 (∂L/∂x is not computed)
    assert mlp_train_flops((3, 4, 2), 5) == 480


def test_ratios_are_reference_time_over_gradfuse_time():
    table = render([Measurement("b", "gradfuse", 0.002), Measurement("b", "numpy", 0.005, "note")])
    assert table.splitlines()[2].split()[1:5] == ["5.000", "ms", "2.50x", "note"]


def test_cnn_flops_count_the_convolutions_and_the_head():
    from gradfuse.bench import cnn_train_flops

    # forward at batch 1 (16 channels): conv1 2·64·16·9, conv2 2·16·32·16·9, head 2·128·10;
    # the backward twice that, less conv1's input gradient
    forward = 2 * 64 * 16 * 9 + 2 * 16 * 32 * 16 * 9 + 2 * 128 * 10
    assert cnn_train_flops(1) == 3 * forward - 2 * 64 * 16 * 9


def test_a_missing_measurement_renders_without_a_ratio():
    import math

    table = render([Measurement("b", "gradfuse", 0.002), Measurement("b", "jax jit", math.nan, "not installed")])
    assert table.splitlines()[2].split() == ["jax", "jit", "-", "not", "installed"]


def test_the_jax_references_train_as_gradfuse_does():
    """Two SGD steps of bench_jax's transformer block and CNN from gradfuse's initial weights end
    at gradfuse's weights (small batches; float32 rounding apart)."""
    import numpy as np

    import gradfuse as gf
    from gradfuse import bench_jax
    from gradfuse.bench import BLOCK, cnn_model, transformer_block_model

    rng = np.random.default_rng(0)
    shape = (2, BLOCK["seq"], BLOCK["width"])
    x, y = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    images, labels = rng.standard_normal((8, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 8)
    for model, make, batch in ((transformer_block_model(), bench_jax.block_step, (x, y)),
                               (cnn_model(), bench_jax.cnn_step, (images, labels))):
        compiled = gf.compile(model, gf.SGD())
        extra = (BLOCK["heads"],) if make is bench_jax.block_step else ()
        step, _ = make({k: v.copy() for k, v in compiled.weights.items()}, *batch, *extra, lr=0.1)  # runs one step
        params = step()
        for _ in range(2):
            compiled.train_step(*batch, lr=0.1)
        for name, value in params.items():
            np.testing.assert_allclose(np.asarray(value), compiled.weights[name], rtol=1e-4, atol=1e-5, err_msg=name)
