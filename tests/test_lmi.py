"""LMI: the native kernel, the dense PyTorch reference and lmi() agree with the contract.

The brute force below is written straight from docs/design.md ("The LMI operator") in float64:
dense soft binning over all B bins, one pixel and one offset at a time.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from galip.runtime import lmi_native
from galip.runtime.errors import ConfigError
from galip.runtime.lmi_native import lmi_numpy, native_available, needs_float64, support_radius
from galip.train import lmi as lmi_module
from galip.train.lmi import lmi, lmi_dense

SIGMA = 8 / 255


def brute_lmi(x, y, patch=3, radius=1, bins=27, sigma=SIGMA, normalize=True, tol=1e-6):
    """(lmi, y_at, offset_index), each (N, 1, H, W), by a per-pixel loop over the contract."""
    x = np.asarray(x, np.float64)[:, 0]
    y = np.asarray(y, np.float64)[:, 0]
    n_img, h, w = x.shape
    centres = np.linspace(0, 1, bins)

    def weights(v):  # (..., B), normalised over all bins
        logits = -((v[..., None] - centres) ** 2) / (2 * sigma**2)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def entropy(p):
        p = p[p > 0]
        return -(p * np.log(p)).sum()

    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    half = patch // 2
    out = np.zeros((3, n_img, 1, h, w))
    for n in range(n_img):
        wx, wy = weights(x[n]), weights(y[n])
        for i in range(h):
            for j in range(w):
                mis = []
                for dy, dx in offsets:
                    pairs = [(wx[a, b], wy[a + dy, b + dx])
                             for a in range(i - half, i + half + 1)
                             for b in range(j - half, j + half + 1)
                             if 0 <= a < h and 0 <= b < w and 0 <= a + dy < h and 0 <= b + dx < w]
                    if not pairs:  # no valid pair: MI := 0
                        mis.append(0.0)
                        continue
                    u, v = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
                    joint = u.T @ v / len(pairs)
                    hx, hy = entropy(joint.sum(1)), entropy(joint.sum(0))
                    mi = hx + hy - entropy(joint)
                    if normalize:
                        mi = 2 * mi / (hx + hy) if hx + hy > 1e-12 else 0.0
                    mis.append(mi)
                mis = np.array(mis)
                t = int(np.flatnonzero(mis >= mis.max() - tol)[0])  # ties: first offset
                dy, dx = offsets[t]
                inside = 0 <= i + dy < h and 0 <= j + dx < w
                out[:, n, 0, i, j] = mis[t], y[n, i + dy, j + dx] if inside else 0.0, t
    return out[0], out[1], out[2].astype(np.int32)


def smooth_image(rng, n, h, w, sigma=3.0):
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.random((n, 1, h, w)), (0, 0, sigma, sigma))
    lo, hi = img.min(), img.max()
    return ((img - lo) / (hi - lo)).astype(np.float32)



@pytest.fixture(scope="module")
def native():
    if not native_available():
        pytest.skip(f"native LMI kernel unavailable: {lmi_native.native_unavailable_reason()}")


def tiny_pair(shape, seed):
    """Random x, y with a few values exactly between two bin centres (worst truncation case)."""
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    x.flat[::5] = (rng.integers(0, 26, x.size)[::5] + 0.5) / 26
    y = np.clip(0.6 * x + 0.4 * rng.random(shape), 0, 1)
    return x.astype(np.float32), y.astype(np.float32)


CASES = [  # (H, W, patch, radius, bins, normalize)
    (h, w, p, r, b, (p + r + b) % 2 == 0)
    for (h, w) in ((7, 9), (6, 6)) for p in (1, 3, 5) for r in (0, 1, 2) for b in (8, 27)
] + [(7, 9, 3, 1, 27, False), (6, 6, 5, 2, 8, True), (6, 6, 3, 1, 27, True)]


@pytest.mark.parametrize("h, w, patch, radius, bins, normalize", CASES)
def test_all_implementations_match_brute_force(native, h, w, patch, radius, bins, normalize):
    x, y = tiny_pair((2, 1, h, w), seed=h * 100 + patch * 10 + radius + bins)
    ref_lmi, ref_y_at, ref_index = brute_lmi(x, y, patch, radius, bins, SIGMA, normalize)
    kw = dict(patch=patch, radius=radius, bins=bins, sigma=SIGMA, normalize=normalize)
    got_lmi, got_y_at, got_index = lmi_numpy(x, y, **kw)
    np.testing.assert_allclose(got_lmi, ref_lmi, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got_index, ref_index)
    np.testing.assert_array_equal(got_y_at, ref_y_at.astype(np.float32))
    for fn in (lmi_dense, lmi):
        value, y_at = fn(torch.from_numpy(x), torch.from_numpy(y), **kw)
        assert value.shape == y_at.shape == (2, 1, h, w) and value.dtype == torch.float32
        np.testing.assert_allclose(value.numpy(), ref_lmi, atol=1e-5, rtol=0, err_msg=fn.__name__)
        np.testing.assert_array_equal(y_at.numpy(), ref_y_at.astype(np.float32))


def test_values_outside_unit_range_bin_like_the_edges(native):
    # Diffusion samples x_t leave [0, 1]; soft binning is a softmax, so they bin like the edges.
    rng = np.random.default_rng(7)
    x = rng.uniform(-0.3, 1.3, (1, 1, 6, 7)).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), -0.5, 1.5).astype(np.float32)
    ref_lmi, ref_y_at, _ = brute_lmi(x, y)
    np.testing.assert_allclose(lmi_numpy(x, y)[0], ref_lmi, atol=1e-5, rtol=0)
    for fn in (lmi_dense, lmi):
        value, y_at = fn(torch.from_numpy(x), torch.from_numpy(y))
        np.testing.assert_allclose(value.numpy(), ref_lmi, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(y_at.numpy(), ref_y_at.astype(np.float32))


@pytest.mark.parametrize("radius", [1, 2])
def test_ties_go_to_the_first_offset(native, radius):
    # X constant -> every joint is an outer product -> MI = 0 for every offset: all tie.
    rng = np.random.default_rng(0)
    x = np.full((1, 1, 6, 7), 0.3, np.float32)
    y = rng.random((1, 1, 6, 7)).astype(np.float32)
    expected_y_at = np.zeros_like(y)
    expected_y_at[..., radius:, radius:] = y[..., :-radius, :-radius]  # Y[i + (-r, -r)], 0 outside
    value, y_at, index = lmi_numpy(x, y, radius=radius)
    assert (index == 0).all() and np.abs(value).max() < 1e-6
    np.testing.assert_array_equal(y_at, expected_y_at)
    for fn in (lmi_dense, lmi):
        value_t, y_at_t = fn(torch.from_numpy(x), torch.from_numpy(y), radius=radius)
        np.testing.assert_array_equal(y_at_t.numpy(), expected_y_at)
    np.testing.assert_array_equal(brute_lmi(x, y, radius=radius)[2], index)


def test_shifted_copy_is_found_at_its_offset(native):
    rng = np.random.default_rng(1)
    x = rng.random((1, 1, 12, 12)).astype(np.float32)
    y = np.zeros_like(x)
    y[..., 1:, :] = x[..., :-1, :]  # Y[j] = X[j - (1, 0)]: pairs match at tau = (+1, 0)
    _, y_at, index = lmi_numpy(x, y, bins=8)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (index[inner] == 7).all()  # (dy + 1) * 3 + (dx + 1)
    np.testing.assert_array_equal(y_at[inner], x[inner])


@pytest.mark.parametrize("patch, factor", [(3, 1.05), (7, 2.0)])
def test_lmi_of_an_image_with_itself_exceeds_lmi_with_noise(native, patch, factor):
    # With 9 samples in 27 bins (the default 3 x 3 patch) the plug-in estimator's bias, maxed
    # over 9 offsets, is almost as large as the self-information of a smooth image: measured
    # ratios 1.05-1.16 (seeds 0-3, smoothing 0.7-2). A 7 x 7 patch gives 2.4-2.7.
    rng = np.random.default_rng(2)
    x = smooth_image(rng, 1, 32, 32, sigma=0.7)
    noise = rng.random(x.shape).astype(np.float32)
    same, _ = lmi(torch.from_numpy(x), torch.from_numpy(x), patch=patch)
    other, _ = lmi(torch.from_numpy(x), torch.from_numpy(noise), patch=patch)
    assert same.mean() > factor * other.mean(), (same.mean(), other.mean())


@pytest.mark.parametrize("bins, normalize", [(8, True), (27, False)])
def test_gradcheck_float64(native, bins, normalize):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 1, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: lmi(a, b, bins=bins, normalize=normalize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-5, fast_mode=True)
    value, ref = fn(x, y)[0], lmi_dense(x, y, bins=bins, normalize=normalize)[0]
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, ref, atol=1e-12, rtol=0)


def test_fast_path_gradient_equals_dense_gradient(native):
    rng = np.random.default_rng(4)
    x0 = torch.from_numpy(smooth_image(rng, 2, 10, 11, sigma=1.5))
    y0 = torch.from_numpy(np.clip(1 - x0.numpy() + 0.05 * rng.standard_normal(x0.shape), 0, 1))
    y0 = y0.float()
    grads = []
    for fn in (lmi, lmi_dense):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        value, y_at = fn(x, y)
        weights = torch.linspace(0, 1, value.numel()).view_as(value)
        ((value * weights).sum() + y_at.sum()).backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
        grads.append((x.grad, y.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_native_matches_dense_at_128(native):
    rng = np.random.default_rng(5)
    x = smooth_image(rng, 1, 128, 128)
    y = np.clip(1 - x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    value, y_at, index = lmi_numpy(x, y)
    with torch.no_grad():
        ref, ref_y_at = lmi_dense(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(value, ref.numpy(), atol=1e-5, rtol=0)
    # Offsets within 1e-6 of each other may be resolved differently by float32 rounding.
    assert (y_at == ref_y_at.numpy()).mean() > 0.999
    assert value.shape == y_at.shape == index.shape == (1, 1, 128, 128) and index.dtype == np.int32


def test_truncation_and_precision_choice(native):
    assert support_radius(27, SIGMA) == 5  # S = 11 bins per sample at the defaults
    assert support_radius(8, SIGMA) == 2
    lib = lmi_native._load()
    for bins in (2, 8, 16, 27, 64):
        for sigma in (2 / 255, SIGMA, 0.05, 0.2):
            assert needs_float64(bins, sigma) == bool(lib.galip_lmi_needs_double_host(bins, sigma))
    assert needs_float64(8, SIGMA) and not needs_float64(27, SIGMA)


def test_builds_into_galip_cache(native, tmp_path, monkeypatch):
    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))
    monkeypatch.setattr(lmi_native, "_lib", None)
    monkeypatch.setattr(lmi_native, "_build_error", None)
    assert native_available()
    built = list((tmp_path / "kernels").iterdir())
    assert [p.name for p in built] == [lmi_native.library_path().name]  # no temp file left


def test_missing_compiler_is_reported_and_lmi_falls_back(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-galip")
    monkeypatch.setenv("GALIP_CACHE", "/nonexistent-galip-cache")
    monkeypatch.setattr(lmi_native, "_lib", None)
    monkeypatch.setattr(lmi_native, "_build_error", None)
    monkeypatch.setattr(lmi_module, "_warned_fallback", False)
    assert not native_available()
    assert "no-such-compiler-galip" in lmi_native.native_unavailable_reason()
    x, y = (torch.from_numpy(a) for a in tiny_pair((1, 1, 5, 5), seed=6))
    with pytest.warns(RuntimeWarning, match="dense PyTorch path"):
        value, y_at = lmi(x, y)
    ref_value, ref_y_at = lmi_dense(x, y)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(y_at, ref_y_at)


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(patch=4), (1, 1, 5, 5), "odd"),
    (dict(radius=-1), (1, 1, 5, 5), "radius"),
    (dict(bins=1), (1, 1, 5, 5), "bins"),
    (dict(sigma=0.0), (1, 1, 5, 5), "sigma"),
    (dict(), (1, 2, 5, 5), "N, 1, H, W"),
])
def test_bad_arguments_raise_one_line_config_errors(kwargs, shape, match):
    x = np.zeros(shape, np.float32)
    for call in (lambda: lmi_numpy(x, x, **kwargs),
                 lambda: lmi(torch.from_numpy(x), torch.from_numpy(x), **kwargs)):
        with pytest.raises(ConfigError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernel_compiles_to_ptx(tmp_path):
    src = tmp_path / "lmi.cu"
    src.write_text(f'#include "{lmi_native.KERNEL_DIR / "lmi.cuh"}"\n')
    proc = subprocess.run(["nvcc", "-ptx", "-arch=compute_80", str(src), "-o",
                           str(tmp_path / "lmi.ptx")], capture_output=True, text=True,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert ".entry galip_lmi_kernel" in (tmp_path / "lmi.ptx").read_text()
