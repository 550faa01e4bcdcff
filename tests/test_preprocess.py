"""The shared preprocessing chain: model-space slices and an exact-enough way back."""
import numpy as np
import pytest

from galip.runtime.intensity import IntensityMap
from galip.runtime.preprocess import PreprocessConfig, plan_volume, slices_to_volume


def _smooth_volume(shape=(30, 26, 22), seed=0):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = np.exp(-(grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2) * 2.0)
    return (1000 * blob + rng.uniform(0, 1, shape)).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_identity_model_round_trip_through_plan(axis):
    data = _smooth_volume()
    affine = np.diag([-1.2, 0.9, 1.5, 1.0])  # LAS, anisotropic
    config = PreprocessConfig(axis=axis, spacing=1.0, size_multiple=32)
    plan, raw = plan_volume(data, affine, "mri", config)
    assert raw.shape == (plan.n_slices, *plan.slice_shape)
    model_in = plan.prepare(raw[:4])
    assert model_in.shape[1:] == plan.model_shape
    assert all(n % 32 == 0 for n in plan.model_shape)
    assert 0.0 <= model_in.min() and model_in.max() <= 1.0
    restored = np.concatenate([plan.restore(plan.prepare(raw[i:i + 3])) for i in range(0, len(raw), 3)])
    volume = slices_to_volume(restored, plan)
    assert volume.shape == data.shape
    # Clipping at the 99.5th percentile caps the brightest voxels; compare below it.
    cap = plan.source_map.hi
    inside = data < 0.9 * cap
    rel = np.abs(volume - data)[inside].max() / cap
    assert rel < 0.02


def test_target_map_sets_output_intensities():
    data = _smooth_volume()
    plan, raw = plan_volume(data, np.eye(4), "mri", PreprocessConfig(spacing=None))
    ones = np.ones((2, *plan.model_shape), np.float32)
    out = plan.restore(ones, IntensityMap(-1000.0, 1000.0))
    np.testing.assert_allclose(out, 1000.0, rtol=1e-6)
