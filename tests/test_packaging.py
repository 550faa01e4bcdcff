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
