"""Issue 16, bundles: malformed manifests, name tricks around the checksums, and graphs that
crash, return the wrong shape or NaN. Each is one line, exit 2, and nothing is written."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures_bundle import build_tiny_bundle, generator_model, lps_affine, phantom_volume, write_volume
from galip.runtime.bundle import MANIFEST_NAME, load_bundle, write_manifest
from galip.runtime.errors import BundleError
from galip.runtime.manifest_schema import max_depth, parse_manifest
from helpers_cli import run_fails, start_run

pytest.importorskip("onnxruntime")
DIMS = ["N", 1, "H", "W"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", diffusion_targets=())


@pytest.fixture
def case(tmp_path, tiny):
    """(a copy of the tiny bundle, a data folder holding a good input volume)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny, bundle)
    data = tmp_path / "data"
    data.mkdir()
    write_volume(data / "in.nii.gz", phantom_volume(), lps_affine())
    return bundle, data


def run_bundle(bundle: Path, data: Path, match: str) -> str:
    return run_fails(data, data / "in.nii.gz", "--to", "T2", "--bundle", bundle, match=match)


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- JSON text
def test_deeply_nested_manifest_is_refused_before_parsing(case):
    bundle, data = case
    (bundle / MANIFEST_NAME).write_text("[" * 100_000)
    run_bundle(bundle, data, match="nested at most 32 deep, found 100000 levels")


def test_depth_ignores_brackets_inside_strings_and_other_json_traps(tmp_path):
    assert max_depth(b'{"a": "[[[[[[", "b": [[1], {"c": "]\\"["}]}') == 3
    source = tmp_path / MANIFEST_NAME
    for raw, match in [(b"x" * (5 << 20), "at most 4 MiB"), (b'{"a": NaN}', "NaN is not a JSON number"),
                       (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON for a manifest"),
                       (b"\xff\xfe", "not UTF-8")]:
        with pytest.raises(BundleError, match=match):
            parse_manifest(raw, source)


# ----------------------------------------------------------------------------- field types and ranges
FIELD_CASES = [
    (("models", "generator", "domains"), 5, "models.generator.domains should be a non-empty list"),
    (("preprocess", "axis"), "x", "preprocess.axis should be an integer from 0 to 2, found 'x'"),
    (("preprocess", "axis"), 5, "preprocess.axis should be an integer from 0 to 2, found 5"),
    (("preprocess", "spacing"), -2, "preprocess.spacing (mm, or null to keep the input's) should be a number"),
    (("preprocess", "spacing"), "2mm", "found '2mm'"),
    (("preprocess", "size_multiple"), 0, "preprocess.size_multiple should be an integer from 1 to 1024, found 0"),
    (("domains", "T2", "class_id"), "one", "domains.T2.class_id should be an integer from 0 to 1023, found 'one'"),
    (("domains", "T2", "suffix"), 5, "domains.T2.suffix should be a string matching"),
    (("preprocess", "percentiles"), [99, 1], "preprocess.percentiles should be [low, high] with low < high"),
    (("preprocess", "bias_field"), "n3", "preprocess.bias_field should be one of none, n4, found 'n3'"),
    (("domains", "T2", "class_id"), True, "found True"),
    (("domains", "T2", "kind"), "pet", "domains.T2.kind should be one of mri, ct, found 'pet'"),
    (("models", "generator", "graphs", "fp32"), "generator.onnx", "models.generator.graphs.fp32 should be an object"),
]


@pytest.mark.parametrize("keys, value, match", FIELD_CASES, ids=[".".join(c[0]) + "=" + repr(c[1]) for c in FIELD_CASES])
def test_manifest_field_of_wrong_type_or_range(case, keys, value, match):
    bundle, data = case
    manifest = manifest_of(bundle)
    node = manifest
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    line = run_bundle(bundle, data, match=match)
    assert "re-export the bundle" in line and str(bundle / MANIFEST_NAME) in line


def test_duplicate_class_ids_and_aliases_are_refused(case):
    bundle, _ = case
    manifest = manifest_of(bundle)
    for edit, match in [(("class_id", 0), "unique"), (("suffix", "T1w"), "a name and suffix no other domain uses")]:
        broken = copy.deepcopy(manifest)
        broken["domains"]["T2"][edit[0]] = edit[1]
        (bundle / MANIFEST_NAME).write_text(json.dumps(broken))
        with pytest.raises(BundleError, match=match):
            load_bundle(bundle)


# ----------------------------------------------------------------------------- name tricks
def external_graph(folder: Path, name: str, location: str = "w.bin") -> Path:
    """The tiny generator saved as ``name`` with its weights in the external file ``location``."""
    onnx.save_model(generator_model(), folder / name, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return folder / name


@pytest.mark.parametrize("stored, referenced, match", [
    ("g.ONNX", "g.ONNX", "'w.bin' is not listed in the manifest's files"),
    ("g.onnx", "g.onnx/", "is not canonical"),
    ("g.onnx", "./g.onnx", "is not canonical"),
])
def test_graph_name_cannot_bypass_the_external_data_check(case, stored, referenced, match):
    """The graph is listed and checksummed but its external data is not: refused whatever its name."""
    bundle, data = case
    graph = external_graph(bundle, stored)
    manifest = manifest_of(bundle)
    manifest["models"]["generator"]["graphs"]["fp32"]["file"] = referenced
    manifest["files"] = {stored: sha256(graph)}
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    run_bundle(bundle, data, match=match)


def test_listed_means_the_same_file_not_the_same_spelling(case):
    """A symlink inside the bundle to a listed file counts as listed; any other file does not."""
    bundle, _ = case
    graph = external_graph(bundle, "g.onnx")
    (bundle / "alias.bin").symlink_to("w.bin")
    manifest = manifest_of(bundle)
    manifest["models"]["generator"]["graphs"]["fp32"]["file"] = "g.onnx"
    manifest["files"] = {"g.onnx": sha256(graph), "alias.bin": sha256(bundle / "w.bin")}
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert load_bundle(bundle).manifest["files"]["alias.bin"]
    write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"})
    assert set(manifest_of(bundle)["files"]) == {"g.onnx", "w.bin"}   # write_manifest lists it by role
    shutil.copy(graph, bundle / "G2.Onnx")
    manifest = manifest_of(bundle)
    manifest["models"]["generator"]["graphs"]["fp32"]["file"] = "G2.Onnx"
    write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"})
    assert {"G2.Onnx", "w.bin"} <= set(manifest_of(bundle)["files"])


# ----------------------------------------------------------------------------- graphs that misbehave
def replace_generator(bundle: Path, nodes, initializers) -> None:
    graph = helper.make_graph(
        nodes, "bad",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, DIMS),
         helper.make_tensor_value_info("domain", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("translated", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, bundle / "generator.onnx")
    manifest = manifest_of(bundle)
    del manifest["files"]
    write_manifest(bundle, manifest)


def test_graph_with_a_fixed_wrong_output_shape(case):
    bundle, data = case
    fixed = numpy_helper.from_array(np.zeros((1, 1, 8, 8), np.float32), "fixed")
    replace_generator(bundle, [helper.make_node("Identity", ["fixed"], ["translated"])], [fixed])
    line = run_bundle(bundle, data, match="returned shape (1, 1, 8, 8) for input (8, 1, 32, 32)")
    assert "generator.onnx of bundle tiny" in line


def test_graph_that_fails_inside_onnxruntime(case):
    bundle, data = case
    shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "shape")    # 32·32 is no multiple of 7
    replace_generator(bundle, [helper.make_node("Reshape", ["image", "shape"], ["translated"])], [shape])
    line = run_bundle(bundle, data, match="failed at run time")
    assert "onnxruntime-cpu: generator.onnx of bundle tiny" in line


def test_graph_that_outputs_nan_writes_nothing(case):
    bundle, data = case
    nan = numpy_helper.from_array(np.array(np.nan, np.float32), "nan")
    replace_generator(bundle, [helper.make_node("Mul", ["image", "nan"], ["translated"])], [nan])
    run_bundle(bundle, data, match="returned 8192 NaN/Inf values of 8192 (slices 0 to 7), nothing written")


def test_backend_failure_is_one_line_in_a_real_process(case):
    """onnxruntime's own C++ log line would be a second stderr line; CliRunner cannot see it."""
    bundle, data = case
    shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "shape")
    replace_generator(bundle, [helper.make_node("Reshape", ["image", "shape"], ["translated"])], [shape])
    process = start_run(data / "in.nii.gz", "--to", "T2", "--bundle", bundle)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert "failed at run time" in line and sorted(p.name for p in data.iterdir()) == ["in.nii.gz"]
