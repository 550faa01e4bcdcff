"""The LMI CUDA kernel up to the TensorRT boundary: nvcc → PTX, host builds of the
per-pixel math, and the ``tensorrt.plugin`` registration driven through a fake module.

No GPU and no full TensorRT here: nothing in this file builds or runs an engine.
"""
import ctypes
import importlib.util
import inspect
import re
import struct
import subprocess
import sys
import types
import typing

import numpy as np
import pytest

from galip.export import kernels
from galip.export.tensorrt import lmi_plugin
from galip.runtime.errors import BackendError, ConfigError

TOL = 1e-5
needs_nvcc = pytest.mark.skipif(not kernels.nvcc_available(),
                                reason="nvcc (CUDA toolkit) not found")


def _pair(rng, n, h, w):
    x = rng.random((n, 1, h, w), dtype=np.float32)
    y = np.clip(0.7 * np.roll(x, 1, axis=3) + 0.3 * rng.random((n, 1, h, w)), 0, 1)
    return x, y.astype(np.float32)


# ---- nvcc → PTX --------------------------------------------------------------------------

@needs_nvcc
def test_ptx_has_the_kernel_with_the_plugin_abi(tmp_path):
    path = kernels.compile_lmi_ptx(tmp_path, arch="sm_80")
    ptx = path.read_text()
    assert ".target sm_80" in ptx
    assert "galip_lmi_kernel" in kernels.ptx_entry_points(ptx)
    # TensorRT's AOT launcher passes input pointers, the extra args, output pointers:
    # x, y; N, H, W, patch, radius, bins, sigma, normalize; lmi, y_at, offset_index.
    assert kernels.ptx_kernel_params(ptx, "galip_lmi_kernel") == lmi_plugin.KERNEL_ABI
    lmi_plugin.check_kernel_abi(ptx)
    params = lmi_plugin.check_device_params(3, 1, 27, 8 / 255, True)
    scalars = [t for t in lmi_plugin.KERNEL_ABI if t != ".u64"]
    assert len(lmi_plugin.kernel_scalar_args(1, 1, 1, params)) == len(scalars)
    assert scalars[6] == ".f32"                  # sigma: the 7th scalar, passed as its bits
    # cached: same key → same file, not rebuilt; another arch → another file
    mtime = path.stat().st_mtime_ns
    assert kernels.compile_lmi_ptx(tmp_path, arch="sm_80") == path
    assert path.stat().st_mtime_ns == mtime
    assert kernels.compile_lmi_ptx(tmp_path, arch="sm_90") != path
    assert not list(tmp_path.glob(".lmi-build-*"))          # temporary folders cleaned up


def test_missing_nvcc_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "nvcc_path", lambda: None)
    assert not kernels.nvcc_available()
    with pytest.raises(BackendError, match="needs nvcc") as info:
        kernels.compile_lmi_ptx(tmp_path)
    assert "\n" not in str(info.value)


def test_ptx_entry_point_parser():
    ptx = """.version 9.0\n.target sm_80\n.visible .entry a_kernel(\n\t.param .u64 a_0,\n
\t.param .f32 a_1\n)\n{\n}\n.entry b2(\n)\n{\n}\n.func (.param .b32 r) helper(\n)\n"""
    assert kernels.ptx_entry_points(ptx) == ["a_kernel", "b2"]
    assert kernels.ptx_kernel_params(ptx, "a_kernel") == [".u64", ".f32"]
    with pytest.raises(BackendError, match="not in the PTX"):
        kernels.ptx_kernel_params(ptx, "missing")


def test_header_is_package_data_and_limits_agree():
    text = kernels.header_path().read_text()
    assert kernels.header_path().name == "lmi.cuh" and "galip_lmi_kernel" in text
    defines = dict(re.findall(r"#define (GALIP_LMI_DEVICE_MAX_\w+) (\d+)", text))
    assert int(defines["GALIP_LMI_DEVICE_MAX_BINS"]) == lmi_plugin.DEVICE_MAX_BINS
    assert int(defines["GALIP_LMI_DEVICE_MAX_RADIUS"]) == lmi_plugin.DEVICE_MAX_RADIUS


# ---- the __host__ __device__ per-pixel math, built for the host ------------------------------

@pytest.fixture(scope="module")
def native():
    from galip.runtime import lmi_native
    if not lmi_native.native_available():
        pytest.skip("the g++ host build of lmi.cuh (galip.runtime.lmi_native) is unavailable")
    return lmi_native


@pytest.mark.skipif(importlib.util.find_spec("galip.train.lmi") is None,
                    reason="galip.train.lmi (the PyTorch reference) is not written yet")
@pytest.mark.parametrize("normalize", [True, False])
def test_host_build_matches_pytorch_lmi(native, normalize):
    """g++ build of lmi.cuh (lmi_native, the LMI engineer's) against galip.train.lmi.

    ``lmi`` itself runs this very build on CPU, so the independent check is ``lmi_dense``,
    the dense differentiable PyTorch reference.
    """
    torch = pytest.importorskip("torch")
    from galip.train.lmi import lmi, lmi_dense
    x, y = _pair(np.random.default_rng(4), 2, 40, 33)
    got_lmi, got_y_at, _ = native.lmi_numpy(x, y, normalize=normalize)
    with torch.no_grad():
        ref = lmi(torch.from_numpy(x), torch.from_numpy(y), normalize=normalize)
        dense = lmi_dense(torch.from_numpy(x[:1, :, :24]), torch.from_numpy(y[:1, :, :24]),
                          normalize=normalize)
    dense_lmi, dense_y_at, _ = native.lmi_numpy(x[:1, :, :24], y[:1, :, :24], normalize=normalize)
    for (a, b), (c, d) in (((got_lmi, got_y_at), ref), ((dense_lmi, dense_y_at), dense)):
        np.testing.assert_allclose(a, c.numpy(), atol=TOL, rtol=0)
        assert np.isclose(b, d.numpy(), atol=TOL, rtol=0).mean() > 0.999


def test_host_build_matches_brute_force_loop(native):
    from test_lmi_onnx import lmi_loop        # the contract, pixel by pixel (tests/ is on sys.path)
    x, y = _pair(np.random.default_rng(6), 2, 9, 12)
    for params in ({}, {"patch": 3, "radius": 2, "bins": 8, "normalize": False}):
        got_lmi, got_y_at, _ = native.lmi_numpy(x, y, **params)
        ref_lmi, ref_y_at, margin = lmi_loop(x, y, **params)
        np.testing.assert_allclose(got_lmi, ref_lmi, atol=TOL, rtol=0)
        decided = margin > 10 * TOL
        np.testing.assert_allclose(got_y_at[decided], ref_y_at[decided], atol=TOL, rtol=0)


@needs_nvcc
def test_nvcc_host_code_matches_gxx_build(native, tmp_path):
    """The same header compiled by nvcc (GALIP_HD = __host__ __device__, host pass) on CPU."""
    lib_path = tmp_path / "lmi_nvcc_host.so"
    source = kernels.header_path().parent / "lmi_host.cpp"
    cmd = [kernels.nvcc_path(), "-x", "cu", "-O3", "-std=c++17", "-arch=sm_80", "-shared",
           "-cudart", "static", "-Xcompiler", "-fPIC,-fopenmp", "-o", str(lib_path), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lib = ctypes.CDLL(str(lib_path))
    f32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    lib.galip_lmi_host.argtypes = [f32, f32] + [ctypes.c_int] * 6 + [ctypes.c_float] + \
        [ctypes.c_int] * 2 + [f32, f32, i32]
    x, y = _pair(np.random.default_rng(7), 2, 31, 26)
    out = [np.empty(x.shape, t) for t in (np.float32, np.float32, np.int32)]
    assert lib.galip_lmi_host(x, y, 2, 31, 26, 3, 1, 27, 8 / 255, 1, 2, *out) == 0
    ref_lmi, ref_y_at, ref_index = native.lmi_numpy(x, y)
    np.testing.assert_allclose(out[0], ref_lmi, atol=TOL, rtol=0)
    assert np.mean(out[2] == ref_index) > 0.999


# ---- tensorrt.plugin registration, up to the TensorRT boundary ------------------------------

def test_module_imports_without_tensorrt():
    code = ("import sys; import galip.export.tensorrt.lmi_plugin as m; "
            "assert 'tensorrt' not in sys.modules; print(m.PLUGIN_ID)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "galip::LMI"


def test_register_without_tensorrt_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)        # import tensorrt → ImportError
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    monkeypatch.setattr(lmi_plugin, "_registered", None)
    with pytest.raises(BackendError, match=r"TensorRT >= 10\.9.*pip install") as info:
        lmi_plugin.register_lmi_plugin()
    assert "\n" not in str(info.value)


class _Expr(int):
    """Stand-in for a TensorRT symbolic shape expression (concrete here)."""


SERIALIZABLE_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64,
                       np.bool_)
FIELD_DTYPES = {int: np.int32, float: np.float32}     # builtin attribute → PluginField dtype


def _ndarray_dtype(annotation):
    """The dtype of a ``numpy.typing.NDArray[dtype]`` annotation, else None."""
    if typing.get_origin(annotation) is not np.ndarray:
        return None
    return typing.get_args(typing.get_args(annotation)[1])[0]


def _fake_tensorrt():
    """``tensorrt`` + ``tensorrt.plugin`` with the decorators and classes the plugin uses.

    As strict as the real package (tensorrt/plugin/_validate.py, _lib.py of 10.9-11.1) where it
    matters: live class annotations, no defaults, TensorDescs first, attributes typed as a
    serializable builtin or ``NDArray[dtype]``; ``create_plugin`` receives every attribute as
    the one-element PluginField array the ONNX parser passes and converts a builtin-typed one
    with ``int(array)`` / ``float(array)``, which fails as on NumPy >= 2.4 whatever NumPy runs
    here; ``trtp.op`` wants an ndarray of the declared dtype for an NDArray attribute and
    exactly the declared builtin type otherwise.
    """
    trt = types.ModuleType("tensorrt")
    trtp = types.ModuleType("tensorrt.plugin")
    trt.plugin = trtp
    trtp.calls = []
    trtp.attrs = {}                 # plugin id → {attribute: annotation}

    class TensorDesc:
        def __init__(self, shape):
            self.shape_expr = tuple(_Expr(d) for d in shape)

        def like(self):
            return TensorDesc(self.shape_expr)

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = 1
        block_x = block_y = block_z = 1
        shared_mem = 0

    class SymExprs(list):
        pass

    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, items):
            return cls(items)

    class SymInt32:
        def __init__(self, value):
            self.value = int(value)

    class AutoTuneCombination:
        def __init__(self, types_, formats=""):
            self.types, self.formats = types_, formats

    def check_annotations(fn):
        params = list(inspect.signature(fn).parameters.values())
        for p in params:
            assert p.default is inspect.Parameter.empty, f"{p.name} has a default"
            assert not isinstance(p.annotation, str), f"{p.name}: string annotation"
        assert inspect.signature(fn).return_annotation is not inspect.Parameter.empty
        return params

    def decorator(kind):
        def with_id(plugin_id):
            def wrap(fn):
                params = check_annotations(fn)
                if kind == "register":
                    attrs = {p.name: p.annotation for p in params if p.annotation is not TensorDesc}
                    for name, annotation in attrs.items():
                        dtype = _ndarray_dtype(annotation)
                        assert annotation in (int, float, str, bytes, bool) or \
                            dtype in SERIALIZABLE_DTYPES, f"{name}: {annotation} is not serializable"
                    trtp.attrs[plugin_id] = attrs
                trtp.calls.append((kind, plugin_id, fn))
                return fn
            return wrap
        return with_id

    def create_plugin(plugin_id, fields):
        """_TemplatePluginCreator.create_plugin: PluginFields → attribute values."""
        attrs = {}
        for name, data in fields.items():
            annotation = trtp.attrs[plugin_id][name]
            dtype = _ndarray_dtype(annotation)
            if dtype is not None:
                attrs[name] = data.astype(dtype)
            else:
                if np.ndim(data) != 0:          # NumPy >= 2.4: int(np.array([3])) is a TypeError
                    raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
                attrs[name] = annotation(data)
        return attrs

    def op_call(plugin_id):
        def call(*tensors, **attrs):
            declared = trtp.attrs[plugin_id]
            assert list(attrs) == list(declared), f"schema {list(attrs)} != {list(declared)}"
            for name, value in attrs.items():
                dtype = _ndarray_dtype(declared[name])
                if dtype is not None:
                    if not isinstance(value, np.ndarray) or value.dtype != np.dtype(dtype):
                        raise ValueError(f"Unexpected dtype for attribute '{name}'")
                elif declared[name] is not type(value):
                    raise ValueError(f"Unexpected type '{type(value)}' for attribute '{name}'")
            return (plugin_id, tensors, attrs)
        return call

    trtp.TensorDesc, trtp.KernelLaunchParams = TensorDesc, KernelLaunchParams
    trtp.SymExprs, trtp.SymIntExprs, trtp.SymInt32 = SymExprs, SymIntExprs, SymInt32
    trtp.AutoTuneCombination = AutoTuneCombination
    trtp.register, trtp.autotune, trtp.aot_impl = (decorator(k) for k in ("register", "autotune",
                                                                          "aot_impl"))
    trtp.create_plugin = create_plugin
    trtp.cdiv = lambda a, b: _Expr(-(-a // b))
    trt.int32, trt.float32 = "int32", "float32"
    trtp.from_shape_expr = lambda shape, dtype: types.SimpleNamespace(shape_expr=shape, dtype=dtype)
    trtp.op = types.SimpleNamespace(galip=types.SimpleNamespace(LMI=op_call("galip::LMI")))
    return trt, trtp


def _parser_fields(trtp, **params):
    """What TensorRT's ONNX parser hands the plugin creator for galip's real LMI node: every
    attribute the plugin declares as a one-element array of its PluginField type."""
    from onnx import helper

    from galip.export.lmi_onnx import lmi_node
    node = lmi_node("x", "y", **params)
    fields = {}
    for attribute in node.attribute:
        annotation = trtp.attrs["galip::LMI"].get(attribute.name)
        if annotation is None:              # plugin_namespace, aot: read by the parser itself
            continue
        dtype = _ndarray_dtype(annotation) or FIELD_DTYPES[annotation]
        fields[attribute.name] = np.array([helper.get_attribute_value(attribute)], dtype)
    return fields


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    trt, trtp = _fake_tensorrt()
    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))          # PTX cache of this test only
    monkeypatch.delenv("GALIP_LMI_PTX", raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(lmi_plugin, "_registered", None)
    if not kernels.nvcc_available():       # control flow still tested, on a stand-in PTX
        stub = tmp_path / "stub.ptx"
        params = ",\n".join(f"\t.param {t} p{i}" for i, t in enumerate(lmi_plugin.KERNEL_ABI))
        stub.write_text(f".version 9.0\n.visible .entry galip_lmi_kernel(\n{params}\n)\n{{\n}}\n")
        monkeypatch.setattr(kernels, "compile_lmi_ptx", lambda out_dir=None, arch=None: stub)
    return trtp


def test_registration_with_fake_tensorrt(fake_trt, tmp_path):
    assert lmi_plugin.register_lmi_plugin(ptx_dir=tmp_path) == "galip::LMI"
    assert lmi_plugin.register_lmi_plugin(ptx_dir=tmp_path) == "galip::LMI"   # once per process
    kinds = [(kind, pid) for kind, pid, _ in fake_trt.calls]
    assert kinds == [("register", "galip::LMI"), ("autotune", "galip::LMI"),
                     ("aot_impl", "galip::LMI")]
    fns = {kind: fn for kind, _, fn in fake_trt.calls}

    # register: inputs x, y then the ONNX node's attributes (lmi_onnx.lmi_node) as attributes
    sig = inspect.signature(fns["register"])
    assert list(sig.parameters) == ["x", "y", "patch", "radius", "bins", "sigma", "normalize"]
    dtypes = [_ndarray_dtype(sig.parameters[n].annotation) for n in ("patch", "sigma", "normalize")]
    assert dtypes == [np.int32, np.float32, np.int32]
    # attributes as the parser passes them (one-element arrays), through create_plugin
    attrs = fake_trt.create_plugin("galip::LMI", _parser_fields(fake_trt))
    assert all(isinstance(v, np.ndarray) and v.shape == (1,) for v in attrs.values())
    x = fake_trt.TensorDesc((2, 1, 100, 77))
    outs = fns["register"](x, x, **attrs)
    assert [o.shape_expr for o in outs] == [x.shape_expr] * 3     # lmi, y_at, offset_index
    assert outs[2].dtype == "int32"

    # autotune: float32 linear in and out, int32 offset index
    (combo,) = fns["autotune"](x, x, outs)
    assert combo.types == "FP32, FP32, FP32, FP32, INT32"

    # aot_impl: the schema TensorRT validates, then name, PTX, launch, int32 extra args
    aot = fns["aot_impl"]
    assert list(inspect.signature(aot).parameters) == [
        "x", "y", "patch", "radius", "bins", "sigma", "normalize", "outputs", "tactic"]
    assert typing.get_origin(inspect.signature(aot).return_annotation) is tuple
    name, ptx, launch, extra = aot(x, x, **attrs, outputs=outs, tactic=0)
    assert name == "galip_lmi_kernel" and name in kernels.ptx_entry_points(ptx)
    assert (launch.grid_x, launch.grid_y, launch.block_x, launch.shared_mem) == (
        -(-100 * 77 // 128), 2, 128, 0)
    assert isinstance(extra, fake_trt.SymExprs)
    values = [e.value for e in extra]
    assert values[:6] == [2, 100, 77, 3, 1, 27] and values[7] == 1
    assert struct.unpack("<f", struct.pack("<i", values[6]))[0] == np.float32(8 / 255)
    # one 4-byte value per scalar .param of the kernel, in order
    assert len(values) == len([t for t in kernels.ptx_kernel_params(ptx, name) if t != ".u64"])

    big = fake_trt.create_plugin("galip::LMI", _parser_fields(fake_trt, bins=64))
    with pytest.raises(ConfigError, match="bins <= 32"):
        aot(x, x, **big, outputs=outs, tactic=0)


def test_strict_fake_rejects_builtin_attributes(fake_trt):
    """The fake can fail: an ``int``-typed attribute breaks on the parser's one-element array,
    as tensorrt.plugin 10.9-11.1 does on NumPy >= 2.4."""
    @fake_trt.register("demo::Old")
    def old_desc(x: fake_trt.TensorDesc, patch: int) -> fake_trt.TensorDesc:
        return x
    with pytest.raises(TypeError, match="0-dimensional"):
        fake_trt.create_plugin("demo::Old", {"patch": np.array([3], np.int32)})


def test_add_lmi_layer_uses_the_aot_plugin(fake_trt, tmp_path):
    calls = []
    network = types.SimpleNamespace(
        add_plugin=lambda plugin, aot: calls.append((plugin, aot)) or "layer")
    assert lmi_plugin.add_lmi_layer(network, "x", "y", bins=16, normalize=False) == "layer"
    (plugin_id, tensors, attrs), aot = calls[0]
    assert (plugin_id, tensors, aot) == ("galip::LMI", ("x", "y"), True)
    assert {k: v.tolist() for k, v in attrs.items()} == {
        "patch": [3], "radius": [1], "bins": [16], "sigma": [pytest.approx(8 / 255)], "normalize": [0]}
    assert attrs["sigma"].dtype == np.float32 and attrs["patch"].dtype == np.int32


def test_registration_with_a_prebuilt_ptx_needs_no_nvcc(fake_trt, tmp_path, monkeypatch):
    ptx = tmp_path / "prebuilt.ptx"
    params = ",\n".join(f"\t.param {t} p{i}" for i, t in enumerate(lmi_plugin.KERNEL_ABI))
    ptx.write_text(f".visible .entry galip_lmi_kernel(\n{params}\n)\n{{\n}}\n// prebuilt\n")
    monkeypatch.setattr(kernels, "nvcc_path", lambda: None)
    monkeypatch.setenv("GALIP_LMI_PTX", str(ptx))
    lmi_plugin.register_lmi_plugin()
    aot = next(fn for kind, _, fn in fake_trt.calls if kind == "aot_impl")
    x = fake_trt.TensorDesc((1, 1, 8, 8))
    attrs = fake_trt.create_plugin("galip::LMI", _parser_fields(fake_trt))
    assert aot(x, x, **attrs, outputs=(x, x, x), tactic=0)[1].endswith("// prebuilt\n")


def test_registration_rejects_a_kernel_with_another_signature(fake_trt, tmp_path, monkeypatch):
    bad = tmp_path / "bad.ptx"
    bad.write_text(".visible .entry galip_lmi_kernel(\n\t.param .u64 a,\n"
                   "\t.param .u64 b\n)\n{\n}\n")
    monkeypatch.setattr(kernels, "compile_lmi_ptx", lambda out_dir=None, arch=None: bad)
    with pytest.raises(BackendError, match="TensorRT plugin passes"):
        lmi_plugin.register_lmi_plugin()
    assert fake_trt.calls == []


def test_launch_grid_and_sigma_bits():
    assert lmi_plugin.launch_grid(3, 128, 128) == {"grid_x": 128, "grid_y": 3, "block_x": 128}
    assert lmi_plugin.launch_grid(1, 100, 77)["grid_x"] == 61
    bits = lmi_plugin.sigma_bits(0.05)
    assert -2**31 <= bits < 2**31
    assert struct.unpack("<f", struct.pack("<i", bits))[0] == np.float32(0.05)
