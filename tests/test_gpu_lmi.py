"""The real LMI CUDA kernel (lmi.cuh's galip_lmi_kernel) on a GPU through CuPy.

Run with ``make gpu-check`` (``pytest -m gpu``) on a machine with a CUDA GPU and CuPy; skipped
elsewhere. Compares against galip.train.lmi.lmi on CPU to 1e-5 and prints ms per call.

The kernel is loaded from nvcc's PTX (galip.export.kernels), the text the TensorRT plugin
embeds, else compiled from the header by NVRTC (galip.bench.gpu_lmi.load_kernel). It is launched exactly as
the TensorRT AOT plugin launches it (galip.export.tensorrt.lmi_plugin): same grid and block,
and sigma passed as the int32 holding its float32 bit pattern.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU machines only)")
torch = pytest.importorskip("torch")

from galip.export.tensorrt import lmi_plugin  # noqa: E402

TOL = 1e-5


def _gpu_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:                 # no driver / no device
        return 0


if _gpu_count() == 0:
    pytest.skip("no CUDA GPU visible to CuPy", allow_module_level=True)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """(galip_lmi_kernel, how it was built): the PTX TensorRT embeds, else NVRTC."""
    from galip.bench.gpu_lmi import load_kernel
    return load_kernel(tmp_path_factory.mktemp("ptx"))


def run_kernel(kernel, x, y, patch=3, radius=1, bins=27, sigma=8 / 255, normalize=True,
               sigma_as_bits=True):
    """Launch as the TensorRT plugin does; x, y (N, 1, H, W) cupy float32 → lmi, y_at, index."""
    n, _, h, w = x.shape
    params = lmi_plugin.check_device_params(patch, radius, bins, sigma, normalize)
    grid = lmi_plugin.launch_grid(n, h, w)
    scalars = lmi_plugin.kernel_scalar_args(n, h, w, params)
    scalars = [np.int32(v) for v in scalars]
    if not sigma_as_bits:
        scalars[6] = np.float32(sigma)
    lmi = cupy.empty(x.shape, cupy.float32)
    y_at = cupy.empty(x.shape, cupy.float32)
    index = cupy.empty(x.shape, cupy.int32)
    kernel((grid["grid_x"], grid["grid_y"]), (grid["block_x"],),
           (x, y, *scalars, lmi, y_at, index))
    return lmi, y_at, index


def _pair(rng, n, h, w):
    x = rng.random((n, 1, h, w), dtype=np.float32)
    y = np.clip(0.7 * np.roll(x, 1, axis=3) + 0.3 * rng.random((n, 1, h, w)), 0, 1)
    return x, y.astype(np.float32)


@pytest.mark.parametrize("hw", [(128, 128), (100, 77)])
@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_kernel_matches_pytorch_lmi(kernel, hw, normalize, capsys):
    from galip.train.lmi import lmi
    fn, how = kernel
    x, y = _pair(np.random.default_rng(hw[0] + normalize), 2, *hw)
    got_lmi, got_y_at, _ = (a.get() for a in run_kernel(fn, cupy.asarray(x), cupy.asarray(y),
                                                       normalize=normalize))
    with torch.no_grad():
        ref_lmi, ref_y_at = lmi(torch.from_numpy(x), torch.from_numpy(y), normalize=normalize)
    np.testing.assert_allclose(got_lmi, ref_lmi.numpy(), atol=TOL, rtol=0)
    agree = np.isclose(got_y_at, ref_y_at.numpy(), atol=TOL, rtol=0)
    assert agree.mean() > 0.999, f"y_at differs at {np.count_nonzero(~agree)} pixels"
    with capsys.disabled():
        print(f"\n[gpu-check] {how}: {hw}, normalize={normalize}: "
              f"max |dLMI| = {np.abs(got_lmi - ref_lmi.numpy()).max():.2e}")


def test_sigma_bits_equal_float_sigma(kernel):
    """TensorRT passes sigma as int32 bits into the kernel's float parameter: same result."""
    fn, _ = kernel
    x, y = (cupy.asarray(a) for a in _pair(np.random.default_rng(9), 1, 40, 37))
    as_bits = run_kernel(fn, x, y, sigma=0.05, sigma_as_bits=True)
    as_float = run_kernel(fn, x, y, sigma=0.05, sigma_as_bits=False)
    for a, b in zip(as_bits, as_float):
        assert cupy.array_equal(a, b)


def test_ms_per_call(kernel, capsys):
    fn, how = kernel
    x, y = (cupy.asarray(a) for a in _pair(np.random.default_rng(0), 1, 128, 128))
    for _ in range(3):
        run_kernel(fn, x, y)                               # warm-up
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    reps = 20
    start.record()
    for _ in range(reps):
        run_kernel(fn, x, y)
    stop.record()
    stop.synchronize()
    ms = cupy.cuda.get_elapsed_time(start, stop) / reps
    with capsys.disabled():
        print(f"\n[gpu-check] galip_lmi_kernel ({how}) 1×1×128×128, defaults: {ms:.3f} ms per call "
              f"on {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    assert ms > 0
