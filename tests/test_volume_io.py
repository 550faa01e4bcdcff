"""Volume I/O, geometry and intensity mapping (runtime, torch-free).

All volumes are synthetic and small; every test writes only under ``tmp_path``.
The key tests run a no-op translation through the whole chain and expect the input back.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from galip.runtime import geometry as G
from galip.runtime import intensity as I
from galip.runtime.errors import BundleError, ConfigError, InputError, OutputError
from galip.runtime.volume import Volume, load_volume, save_volume

# Relative tolerances of the no-op chain (error / max |input|) with linear interpolation
# on the smooth test volume: measured ~1.5e-3 in the interior and ~4e-3 at the border.
INTERIOR_RTOL = 5e-3
BORDER_RTOL = 1e-2


# --- helpers --------------------------------------------------------------------------

def oblique_affine() -> np.ndarray:
    """~15 degrees about x and z, anisotropic 1.3 x 0.9 x 1.1 mm voxels."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xz", [15, 15], degrees=True).as_matrix() @ np.diag([1.3, 0.9, 1.1])
    affine[:3, 3] = [-20.0, 30.0, 10.0]
    return affine


def lps_affine(zooms=(1.3, 0.9, 1.1)) -> np.ndarray:
    affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    affine[:3, 3] = [25.0, 20.0, -15.0]
    return affine


def smooth_volume(shape, affine) -> np.ndarray:
    """Smooth, asymmetric (so a flip or transpose shows) function of world position."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    d = ijk @ affine[:3, :3].T + affine[:3, 3]
    d = d - d.mean(0)
    v = (100 + 60 * np.exp(-np.sum(d**2, 1) / (2 * 12**2)) + 0.8 * d[:, 0] + 0.4 * d[:, 1] - 0.3 * d[:, 2]
         + 10 * np.sin(d[:, 1] / 9.0))
    return v.reshape(shape).astype(np.float32)


def write_nifti(path, data, affine=None, *, dtype=None, slope=None, inter=None, codes=(1, 1), units=("mm", "sec"),
                image_class=nib.Nifti1Image):
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    image = image_class(data, affine, dtype=dtype)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    image.header.set_xyzt_units(*units)
    nib.save(image, path)
    if slope is not None:  # nibabel recomputes scaling on save: patch the written header instead
        raw = bytearray(gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes())
        header = image_class.header_class(bytes(raw[:image_class.header_class.template_dtype.itemsize]))
        header["scl_slope"], header["scl_inter"] = slope, inter
        raw[:len(header.binaryblock)] = header.binaryblock
        path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def relative_error(a, b, border=0):
    if border:
        a, b = a[border:-border, border:-border, border:-border], b[border:-border, border:-border, border:-border]
    return float(np.abs(a - b).max() / np.abs(b).max())


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_modules_do_not_import_torch():
    code = ("import sys; import galip.runtime.volume, galip.runtime.geometry, galip.runtime.intensity; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- load -------------------------------------------------------------------------------

def test_load_applies_int16_scaling_and_keeps_geometry(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
    path = write_nifti(tmp_path / "s.nii.gz", raw, lps_affine(), slope=0.5, inter=10.0, codes=(1, 4))
    image = nib.load(path)  # nibabel moves scl_slope/inter from the header into dataobj
    assert (image.dataobj.slope, image.dataobj.inter) == (0.5, 10.0) and image.get_data_dtype() == np.int16

    volume = load_volume(path)
    assert isinstance(volume, Volume)
    assert volume.data.dtype == np.float32 and volume.data.shape == (4, 5, 6)
    np.testing.assert_array_equal(volume.data, raw.astype(np.float32) * 0.5 + 10.0)
    assert volume.affine.dtype == np.float64
    np.testing.assert_allclose(volume.affine, lps_affine(), atol=1e-6)
    assert (int(volume.header["qform_code"]), int(volume.header["sform_code"])) == (1, 4)
    assert volume.header.get_xyzt_units() == ("mm", "sec")
    assert volume.n_nonfinite == 0


def test_save_load_round_trip_keeps_values_affine_codes_units(tmp_path):
    raw = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    micron = oblique_affine() * [[1000], [1000], [1000], [1]]   # 1.3 x 0.9 x 1.6 mm voxels, in µm
    src = write_nifti(tmp_path / "in.nii.gz", raw, micron, slope=2.5, inter=-3.0, codes=(2, 4),
                      units=("micron", "msec"))
    volume = load_volume(src)
    data_before = volume.data.copy()
    out = save_volume(tmp_path / "out.nii.gz", volume.data, volume.affine, volume.header, description="x" * 200)
    assert out == tmp_path / "out.nii.gz"
    np.testing.assert_array_equal(volume.data, data_before)  # input never modified

    image = nib.load(out)
    assert image.get_data_dtype() == np.float32
    assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (2, 4)
    assert image.header.get_xyzt_units() == ("micron", "msec")
    assert image.header["descrip"].tobytes().rstrip(b"\0") == b"x" * 79
    again = load_volume(out)
    np.testing.assert_array_equal(again.data, volume.data)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-5)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_without_header_and_with_zero_codes_keeps_affine(tmp_path):
    data = np.random.default_rng(0).random((5, 6, 7), dtype=np.float32)
    out = save_volume(tmp_path / "plain.nii", data, lps_affine(), description="galip ✓")
    image = nib.load(out)
    assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (1, 1)
    assert image.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(image.affine, lps_affine(), atol=1e-6)
    # A reference header with codes 0/0 must not make the affine fall back to pixdim.
    zero = nib.Nifti1Header()
    out2 = save_volume(tmp_path / "zero.nii", data, oblique_affine(), zero)
    np.testing.assert_allclose(nib.load(out2).affine, oblique_affine(), atol=1e-5)


def test_load_nifti2(tmp_path):
    data = smooth_volume((4, 5, 6), lps_affine())
    path = write_nifti(tmp_path / "n2.nii", data, lps_affine(), image_class=nib.Nifti2Image)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.data, data)
    assert isinstance(volume.header, nib.Nifti1Header)


def test_load_nifti_pair_from_either_file(tmp_path):
    data = smooth_volume((4, 5, 6), lps_affine())
    nib.Nifti1Pair(data, lps_affine()).to_filename(tmp_path / "pair.img")
    for name in ("pair.hdr", "pair.img"):
        volume = load_volume(tmp_path / name)
        np.testing.assert_array_equal(volume.data, data)
        np.testing.assert_allclose(volume.affine, lps_affine(), atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 5, 6, 1), (4, 5, 6, 1, 1)])
def test_load_squeezes_singleton_extra_dimensions(tmp_path, shape):
    data = np.random.default_rng(1).random(shape).astype(np.float32) + 1
    volume = load_volume(write_nifti(tmp_path / "v.nii.gz", data))
    assert volume.data.shape == (4, 5, 6)
    np.testing.assert_array_equal(volume.data, data.reshape(4, 5, 6))


def test_load_replaces_nonfinite_and_counts_them(tmp_path):
    data = np.ones((4, 5, 6), dtype=np.float32)
    data[0, 0, 0], data[1, 2, 3], data[3, 4, 5] = np.nan, np.inf, -np.inf
    volume = load_volume(write_nifti(tmp_path / "nan.nii.gz", data))
    assert volume.n_nonfinite == 3
    assert np.isfinite(volume.data).all()
    assert volume.data[0, 0, 0] == volume.data[1, 2, 3] == volume.data[3, 4, 5] == 0
    assert volume.data.sum() == data.size - 3


def test_all_zero_volume_is_refused_unless_signal_not_required(tmp_path):
    path = write_nifti(tmp_path / "zero.nii.gz", np.zeros((4, 5, 6), dtype=np.float32))
    with pytest.raises(InputError, match="all 120 voxels 0") as info:
        load_volume(path)
    assert str(path) in one_line(info.value)
    assert load_volume(path, require_signal=False).data.shape == (4, 5, 6)
    nan_path = write_nifti(tmp_path / "nan.nii.gz", np.full((2, 2, 2), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="8 of them NaN/Inf"):
        load_volume(nan_path)


def _truncated_gz(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", smooth_volume((20, 20, 20), np.eye(4)))
    raw = good.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _corrupt_gz(tmp_path):
    # A flipped byte deep in the stream: nibabel alone reads garbage silently, the CRC catches it.
    good = write_nifti(tmp_path / "good.nii.gz", np.random.default_rng(2).random((30, 30, 30), dtype=np.float32))
    raw = bytearray(good.read_bytes())
    raw[2000] ^= 0xFF
    path = tmp_path / "flip.nii.gz"
    path.write_bytes(bytes(raw))
    return path


def _truncated_nii(tmp_path):
    good = write_nifti(tmp_path / "good.nii", smooth_volume((20, 20, 20), np.eye(4)))
    path = tmp_path / "cut.nii"
    path.write_bytes(good.read_bytes()[:5000])
    return path


def _text(name):
    def make(tmp_path):
        path = tmp_path / name
        path.write_text("this is not an image\n" * 50)
        return path
    return make


def _gz_text(tmp_path):
    path = tmp_path / "text_in_gzip.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all\n" * 50))
    return path


def _array(shape, dtype=np.float32):
    def make(tmp_path):
        return write_nifti(tmp_path / "a.nii.gz", np.ones(shape, dtype=dtype))
    return make


def _mgh(tmp_path, name="brain.mgh"):
    path = tmp_path / name
    nib.MGHImage(np.ones((4, 4, 4), dtype=np.float32), np.eye(4)).to_filename(path)
    return path


def _degenerate_affine(tmp_path):
    affine = np.diag([1.0, 1.0, 0.0, 1.0])  # the third voxel axis has no extent
    header = nib.Nifti1Header()
    header.set_data_shape((3, 3, 3))
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    image = nib.Nifti1Image(np.ones((3, 3, 3), dtype=np.float32), None, header)
    path = tmp_path / "flat.nii.gz"
    nib.save(image, path)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda tmp_path: tmp_path / "missing.nii.gz", "found nothing at that path"),
    (lambda tmp_path: tmp_path, "found a folder"),
    (_text("text.nii.gz"), "not gzip-compressed"),
    (_text("text.nii"), "without a NIfTI header \\(starts with b'this is '"),
    (_gz_text, "without a NIfTI header"),
    (_truncated_gz, "truncated or corrupt"),
    (_corrupt_gz, "truncated or corrupt"),
    (_truncated_nii, "truncated or corrupt"),
    (_mgh, "without a NIfTI header"),
    (lambda tmp_path: _mgh(tmp_path, "brain.mgz"), "gzip-compressed data without a NIfTI header"),
    (_array((8, 9)), "found a 2-D image of shape \\(8, 9\\)"),
    (_array((4, 5, 6, 2)), "4-D series of 2 volumes"),
    (_array((4, 5, 6, 1, 3)), "found a 5-D image"),
    (_array((3, 3, 3), np.complex64), "dtype complex64"),
    (_degenerate_affine, "invertible voxel-to-world affine"),
])
def test_load_refuses_bad_inputs_with_one_line(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(InputError, match=match) as info:
        load_volume(path)
    message = one_line(info.value)
    assert str(path) in message and "expected" in message and ";" in message


# --- save -------------------------------------------------------------------------------

def test_save_refuses_to_overwrite_and_overwrites_when_asked(tmp_path):
    data = np.ones((3, 4, 5), dtype=np.float32)
    path = save_volume(tmp_path / "o.nii.gz", data, np.eye(4))
    with pytest.raises(OutputError, match="existing one; pass --overwrite"):
        save_volume(path, data * 2, np.eye(4))
    assert load_volume(path).data.max() == 1
    save_volume(path, data * 2, np.eye(4), overwrite=True)
    assert load_volume(path).data.max() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.nii.gz"]


@pytest.mark.parametrize("name, match", [
    ("no_such_folder/o.nii.gz", "existing output folder"),
    ("o.mgz", "ending in .nii or .nii.gz"),
])
def test_save_refuses_bad_targets(tmp_path, name, match):
    with pytest.raises(OutputError, match=match) as info:
        save_volume(tmp_path / name, np.ones((2, 2, 2)), np.eye(4))
    one_line(info.value)


def test_save_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch):
    def half_write_then_fail(self, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", half_write_then_fail)
    with pytest.raises(OutputError, match="No space left on device"):
        save_volume(tmp_path / "o.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_save_turns_permission_error_into_output_error(tmp_path, monkeypatch):
    # Runs as root too: the temporary file cannot be created in the target folder.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr("galip.runtime.atomic.tempfile.mkstemp", refuse)
    with pytest.raises(OutputError, match="writable output folder.*Permission denied") as info:
        save_volume(tmp_path / "o.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    one_line(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="permissions do not bind root")
def test_save_into_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="writable output folder"):
            save_volume(folder / "o.nii.gz", np.ones((2, 2, 2)), np.eye(4))
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


# --- geometry -----------------------------------------------------------------------------

def test_to_canonical_gives_ras_and_from_canonical_undoes_it():
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    affine = lps_affine()
    data_c, affine_c, ornt = G.to_canonical(data, affine)
    assert nib.aff2axcodes(affine_c) == ("R", "A", "S")
    # Same world position for the same voxel value.
    i, j, k = 1, 2, 3
    (ic, jc, kc) = [int(v) for v in np.argwhere(data_c == data[i, j, k])[0]]
    np.testing.assert_allclose(affine_c @ [ic, jc, kc, 1], affine @ [i, j, k, 1])
    back = G.from_canonical(data_c, ornt)
    np.testing.assert_array_equal(back, data)
    assert not np.shares_memory(back, data_c) and not np.shares_memory(data_c, data)


def test_from_canonical_inverts_every_axis_permutation_and_flip():
    data = np.random.default_rng(3).random((2, 3, 4)).astype(np.float32)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1, 1), repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = np.eye(3)[:, perm] * signs
            data_c, affine_c, ornt = G.to_canonical(data, affine)
            assert nib.aff2axcodes(affine_c) == ("R", "A", "S")
            np.testing.assert_array_equal(G.from_canonical(data_c, ornt), data)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume2slices_and_back(axis):
    data = np.random.default_rng(4).random((3, 4, 5)).astype(np.float32)
    stack = G.volume2slices(data, axis)
    assert stack.shape == (data.shape[axis], *[n for a, n in enumerate(data.shape) if a != axis])
    np.testing.assert_array_equal(stack[1], np.take(data, 1, axis=axis))
    np.testing.assert_array_equal(G.slices2volume(stack, axis), data)
    with pytest.raises(ValueError, match="axis 0, 1 or 2, got 3"):
        G.volume2slices(data, 3)


def test_inplane_spacing_from_oblique_affine():
    affine = oblique_affine()
    assert G.inplane_spacing(affine, 0) == pytest.approx((0.9, 1.1))
    assert G.inplane_spacing(affine, 1) == pytest.approx((1.3, 1.1))
    assert G.inplane_spacing(affine, 2) == pytest.approx((1.3, 0.9))


def test_resample_to_same_spacing_is_exact_noop():
    stack = np.random.default_rng(5).random((3, 17, 23)).astype(np.float32)
    out, record = G.resample_slices(stack, (1.3, 0.9), (1.3, 0.9))
    assert out.dtype == np.float32 and not np.shares_memory(out, stack)
    np.testing.assert_array_equal(out, stack)
    np.testing.assert_array_equal(G.restore_slices(out, record), stack)


def test_resample_grid_is_centred_with_exact_target_spacing():
    # A linear ramp in mm is reproduced exactly by linear interpolation inside the grid.
    n_h, n_w, s_h, s_w = 21, 15, 1.3, 0.9
    pos_h = (np.arange(n_h) - (n_h - 1) / 2) * s_h
    pos_w = (np.arange(n_w) - (n_w - 1) / 2) * s_w
    stack = (pos_h[:, None] + 10 * pos_w[None, :])[None].astype(np.float64)
    out, record = G.resample_slices(stack, (s_h, s_w), (1.0, 1.0), anti_alias=False)
    assert record.out_shape == (int(np.ceil(20 * 1.3)) + 1, int(np.ceil(14 * 0.9)) + 1) == out.shape[1:]
    new_h = (np.arange(out.shape[1]) - (out.shape[1] - 1) / 2) * 1.0
    new_w = (np.arange(out.shape[2]) - (out.shape[2] - 1) / 2) * 1.0
    inside = (np.abs(new_h) <= pos_h[-1])[:, None] & (np.abs(new_w) <= pos_w[-1])[None, :]
    np.testing.assert_allclose(out[0][inside], (new_h[:, None] + 10 * new_w[None, :])[inside], atol=1e-9)
    back = G.restore_slices(out, record)
    assert back.shape == stack.shape
    # The outer W samples lie past the input's edge centres (1.0 * 13 > 0.9 * 14 mm): their
    # values repeat the edge (mode "nearest"), so the ramp is exact back one sample inside.
    np.testing.assert_allclose(back[:, :, 1:-1], stack[:, :, 1:-1], atol=1e-9)
    np.testing.assert_allclose(back, stack, atol=0.5 * 0.9 * 10)


def test_restore_slices_checks_the_shape():
    out, record = G.resample_slices(np.ones((2, 10, 10), np.float32), (1.0, 1.0), (2.0, 2.0))
    with pytest.raises(ValueError, match="expected an \\(n, 6, 6\\) stack"):
        G.restore_slices(out[:, :5], record)


def test_pad_to_multiple_with_stack_minimum_and_crop_back():
    stack = np.random.default_rng(6).random((2, 33, 64)).astype(np.float32) - 5
    padded, record = G.pad_to_multiple(stack, 32)
    assert padded.shape == (2, 64, 64) and padded.dtype == np.float32
    assert record.pad == ((15, 16), (0, 0)) and record.value == stack.min()
    assert padded[:, 0].max() == padded[:, -1].min() == stack.min()
    np.testing.assert_array_equal(G.crop_to_record(padded, record), stack)
    zero, _ = G.pad_to_multiple(stack, 32, value=0.0)
    assert zero[0, 0, 0] == 0


# --- intensity ----------------------------------------------------------------------------

def test_fit_intensity_mri_uses_nonzero_or_masked_voxels():
    data = np.zeros((10, 10, 10), dtype=np.float32)
    data[2:8, 2:8, 2:8] = np.linspace(1, 100, 216).reshape(6, 6, 6)
    imap = I.fit_intensity(data, "mri", percentiles=(0, 100))
    assert (imap.lo, imap.hi) == (1.0, 100.0)
    mask = np.zeros(data.shape, bool)
    mask[0:3, 0:3, 0:3] = True  # mostly zeros, includes data[2, 2, 2] == 1
    assert I.fit_intensity(data, "mri", percentiles=(0, 100), mask=mask) == I.IntensityMap(0.0, 1.0)
    robust = I.fit_intensity(data, "mri")
    assert 1 < robust.lo < robust.hi < 100


def test_fit_intensity_ct_uses_the_window_and_errors():
    ct = np.full((4, 4, 4), -1024.0, dtype=np.float32)
    ct[1:3, 1:3, 1:3] = 40.0
    assert I.fit_intensity(ct, "ct") == I.IntensityMap(-1000.0, 1000.0)
    assert I.fit_intensity(ct, "ct", ct_window=(-200, 300)).to_dict() == {"lo": -200.0, "hi": 300.0}
    with pytest.raises(InputError, match="max -1024 HU"):
        I.fit_intensity(np.full((2, 2, 2), -1024.0), "ct")
    with pytest.raises(InputError, match="no nonzero voxels"):
        I.fit_intensity(np.zeros((2, 2, 2)), "mri")
    with pytest.raises(InputError, match="constant intensity 7"):
        I.fit_intensity(np.full((2, 2, 2), 7.0), "mri")
    with pytest.raises(ConfigError, match="'pet'"):
        I.fit_intensity(ct, "pet")
    with pytest.raises(ConfigError, match="percentiles"):
        I.fit_intensity(ct, "mri", percentiles=(90, 10))


def test_intensity_map_json_round_trip_and_malformed():
    imap = I.IntensityMap(-3.5, 812.25)
    assert I.IntensityMap.from_dict(json.loads(json.dumps(imap.to_dict()))) == imap
    for bad in ({"lo": 1.0}, {"lo": 2.0, "hi": 1.0}, {"lo": "a", "hi": 1.0}, {"lo": 0.0, "hi": float("nan")}):
        with pytest.raises(BundleError, match="intensity map") as info:
            I.IntensityMap.from_dict(bad)
        one_line(info.value)


def test_normalize_clip_and_exact_inverse():
    imap = I.IntensityMap(10.0, 110.0)
    x = np.array([0.0, 10.0, 60.0, 110.0, 500.0], dtype=np.float32)
    np.testing.assert_allclose(I.normalize(x, imap), [-0.1, 0.0, 0.5, 1.0, 4.9], rtol=1e-6)
    np.testing.assert_array_equal(I.normalize(x, imap, clip=True), [0.0, 0.0, 0.5, 1.0, 1.0])
    y = I.denormalize(I.normalize(x, imap), imap)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-5)


# --- the key test: a no-op translation through the whole chain ---------------------------

def translate_noop(src, dst, axis, target_spacing, multiple=32, normalize=True):
    """load -> canonical -> slices -> resample -> pad -> normalize -> identity -> back -> save."""
    volume = load_volume(src)
    data_c, affine_c, ornt = G.to_canonical(volume.data, volume.affine)
    stack = G.volume2slices(data_c, axis)
    stack, resample_record = G.resample_slices(stack, G.inplane_spacing(affine_c, axis), target_spacing)
    stack, pad_record = G.pad_to_multiple(stack, multiple)
    assert stack.shape[1] % multiple == 0 and stack.shape[2] % multiple == 0
    if normalize:
        imap = I.fit_intensity(volume.data, "mri")
        stack = I.denormalize(I.normalize(stack, imap), imap)  # the identity "model" in between
    stack = G.restore_slices(G.crop_to_record(stack, pad_record), resample_record)
    data = G.from_canonical(G.slices2volume(stack, axis), ornt)
    save_volume(dst, data, volume.affine, volume.header, description="galip no-op")
    return volume, load_volume(dst)


def _check_geometry(before, after, affine):
    assert after.data.shape == before.data.shape
    np.testing.assert_allclose(after.affine, affine, atol=1e-5)
    np.testing.assert_allclose(after.affine, before.affine, atol=1e-6)
    assert nib.aff2axcodes(after.affine) == nib.aff2axcodes(affine)
    assert (int(after.header["qform_code"]), int(after.header["sform_code"])) == (1, 1)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("case", ["oblique", "lps"])
def test_noop_translation_reproduces_the_input(tmp_path, case, axis):
    affine = oblique_affine() if case == "oblique" else lps_affine()
    if case == "lps":
        assert nib.aff2axcodes(affine) == ("L", "P", "S")
    data = smooth_volume((34, 40, 30), affine)
    src = write_nifti(tmp_path / "in.nii.gz", data, affine)
    before, after = translate_noop(src, tmp_path / "out.nii.gz", axis, (1.0, 1.0))
    _check_geometry(before, after, affine)
    assert relative_error(after.data, before.data, border=2) < INTERIOR_RTOL
    assert relative_error(after.data, before.data) < BORDER_RTOL


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_noop_translation_is_exact_when_spacing_matches(tmp_path, axis):
    affine = lps_affine(zooms=(1.0, 1.0, 1.0))
    data = smooth_volume((33, 40, 29), affine)  # no side a multiple of 32: padding happens
    src = write_nifti(tmp_path / "in.nii.gz", data, affine)
    before, after = translate_noop(src, tmp_path / "geo.nii.gz", axis, (1.0, 1.0), normalize=False)
    _check_geometry(before, after, affine)
    np.testing.assert_array_equal(after.data, before.data)
    before, after = translate_noop(src, tmp_path / "norm.nii.gz", axis, (1.0, 1.0))
    np.testing.assert_allclose(after.data, before.data, rtol=1e-6, atol=1e-6 * np.abs(before.data).max())


def test_voxel_axis_names_the_voxel_axis_of_each_world_axis():
    from galip.runtime.geometry import to_canonical, voxel_axis
    affine = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -5], [0, 1.0, 0, 3], [0, 0, 0, 1]])   # (y, z, -x) voxels
    assert [voxel_axis(affine, w) for w in range(3)] == [2, 0, 1]
    data = np.zeros((4, 5, 6), np.float32)
    canonical, _, _ = to_canonical(data, affine)
    assert canonical.shape == tuple(data.shape[voxel_axis(affine, w)] for w in range(3))
