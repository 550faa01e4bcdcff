"""The layers install under one namespace and nothing generic lands in site-packages."""
import importlib
import importlib.util


def test_layers_import_under_galip_namespace():
    for layer in ("runtime", "train", "export", "bench"):
        module = importlib.import_module(f"galip.{layer}")
        assert module.__name__ == f"galip.{layer}"


def test_no_generic_top_level_names():
    for generic in ("runtime", "train", "export", "bench"):
        spec = importlib.util.find_spec(generic)
        assert spec is None or "site-packages" not in (spec.origin or ""), generic


def test_gpu_extras_are_one_coherent_stack_per_cuda_major():
    """Each gpu-cuNN extra pins TensorRT, cuda-python and onnxruntime-gpu (with its CUDA and
    cuDNN libraries) to builds for CUDA NN only; ``gpu`` is the CUDA 12 stack."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert extras["gpu"] == ["galip[gpu-cu12]"]
    # onnxruntime-gpu 1.21-1.26 are CUDA 12 builds, 1.27 and later CUDA 13 (their [cuda] extras
    # pull nvidia-*-cu12 / CUDA 13 libraries).
    ort_cuda = {12: (Version("1.21"), Version("1.26.99")), 13: (Version("1.27"), Version("1.99"))}
    for major in (12, 13):
        reqs = {r.name: r for r in map(Requirement, extras[f"gpu-cu{major}"])}
        assert set(reqs) == {"onnx", "SimpleITK", f"tensorrt-cu{major}", "cuda-python", "onnxruntime-gpu"}
        trt = reqs[f"tensorrt-cu{major}"].specifier
        assert "10.13.2" in trt and "11.4.0" in trt and "12.0" not in trt and "10.8.0" not in trt
        cuda = reqs["cuda-python"].specifier
        assert f"{major}.6.2" in cuda or f"{major}.0.0" in cuda
        assert not any(f"{other}.0.0" in cuda for other in (11, 12, 13, 14) if other != major)
        ort = reqs["onnxruntime-gpu"]
        assert ort.extras == {"cuda", "cudnn"}
        low, high = ort_cuda[major]
        assert low in ort.specifier and high in ort.specifier
        assert not any(v in ort.specifier for lo, hi in ort_cuda.values() if (lo, hi) != (low, high) for v in (lo, hi))
