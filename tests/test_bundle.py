"""Bundle manifest: write, load, verify when opened, and refuse what escapes or was tampered with."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from galip.runtime.bundle import (
    MANIFEST_NAME, SCHEMA_VERSION, load_bundle, onnx_external_locations, verify_checksums, write_manifest,
)
from galip.runtime.errors import BundleError, ConfigError


def tiny_graph(scale: float = 2.0) -> onnx.ModelProto:
    """translated = image * scale + domain, image: float32[N,1,H,W], domain: int64[N]."""
    nodes = [
        helper.make_node("Cast", ["domain"], ["domain_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["domain_f", "col"], ["domain_col"]),
        helper.make_node("Mul", ["image", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "domain_col"], ["translated"]),
    ]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "col")]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"]),
         helper.make_tensor_value_info("domain", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("translated", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def base_manifest(**generator) -> dict:
    gen = {"domains": ["T1", "T2"], "graphs": {"fp32": {"file": "generator.onnx"}},
           "engines": [], "io": {"inputs": {"image": "float32[N,1,H,W]", "domain": "int64[N]"},
                                 "outputs": {"translated": "float32[N,1,H,W]"}}}
    gen.update(generator)
    return {
        "preprocess": {"axis": 2, "spacing": 2.0, "size_multiple": 32, "percentiles": [0.5, 99.5]},
        "domains": {"T1": {"caption": "this MRI is T1-weighted", "class_id": 0, "kind": "mri", "suffix": "T1w"},
                    "T2": {"caption": "this MRI is T2-weighted", "class_id": 1, "kind": "mri", "suffix": "T2w"}},
        "models": {"generator": gen},
    }


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    onnx.save(tiny_graph(), root / "generator.onnx")
    return root


def write_raw(root, manifest):
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_write_then_load_verifies(folder):
    manifest = base_manifest()
    path = write_manifest(folder, manifest)
    assert path == folder / MANIFEST_NAME and "files" not in manifest     # input untouched
    written = json.loads(path.read_text())
    assert list(written)[:2] == ["schema_version", "galip_version"] and written["schema_version"] == SCHEMA_VERSION
    expected = hashlib.sha256((folder / "generator.onnx").read_bytes()).hexdigest()
    assert written["files"] == {"generator.onnx": expected}
    assert written["sizes"] == {"generator.onnx": (folder / "generator.onnx").stat().st_size}
    assert sorted(p.name for p in folder.iterdir()) == ["generator.onnx", MANIFEST_NAME]   # no temp files left
    bundle = load_bundle(folder)
    assert bundle.domains["T2"].caption == "this MRI is T2-weighted" and bundle.domains["T2"].class_id == 1
    assert bundle.model("generator", "t2w").graphs["fp32"].file == "generator.onnx"
    assert bundle.model("generator", "t2-weighted") is bundle.generator
    assert bundle.graph_path("generator") == (folder / "generator.onnx").resolve()
    assert bundle.preprocess["size_multiple"] == 32 and verify_checksums(bundle) == []
    with pytest.raises(ConfigError, match="no fp16 graph"):
        bundle.graph_path("generator", "fp16")
    with pytest.raises(ConfigError, match="unknown domain 'CT'"):
        bundle.model("generator", "CT")
    with pytest.raises(BundleError, match="no 'diffusion' model"):
        bundle.model("diffusion", "T2")


def test_diffusion_models_and_extra_files(folder):
    onnx.save(tiny_graph(0.5), folder / "diffusion_T2_step.onnx")
    (folder / "lmi.onnx").write_bytes((folder / "generator.onnx").read_bytes())
    (folder / "notes.npz").write_bytes(b"extra")
    manifest = base_manifest()
    manifest["models"]["diffusion"] = {"T2": {
        "graphs": {"fp32": {"file": "diffusion_T2_step.onnx"}}, "lmi_graph": {"file": "lmi.onnx"},
        "engines": [], "schedule": {"kind": "ddpm_linear", "beta_start": 1e-4, "beta_end": 0.02, "timesteps": 1000},
        "lmi": {"patch": 3, "radius": 1, "bins": 27, "sigma": 0.0313725, "normalize": True},
        "sampler": {"default": "ddim", "steps": 50}}}
    manifest["files"] = {"notes.npz": "0" * 64}          # extra listed file: rehashed
    write_manifest(folder, manifest)
    bundle = load_bundle(folder)
    assert set(bundle.manifest["files"]) == {"generator.onnx", "diffusion_T2_step.onnx", "lmi.onnx", "notes.npz"}
    assert bundle.model("diffusion", "T2w").lmi_graph.file == "lmi.onnx"
    with pytest.raises(ConfigError, match="needs a target domain"):
        bundle.model("diffusion")


def test_tampered_byte_names_the_file(folder):
    write_manifest(folder, base_manifest())
    data = (folder / "generator.onnx").read_bytes()
    two, three = np.float32(2).tobytes(), np.float32(3).tobytes()
    assert data.count(two) == 1                                  # the "scale" weight: still a valid graph
    (folder / "generator.onnx").write_bytes(data.replace(two, three))
    bundle = load_bundle(folder)                  # same size: found when the graph is opened
    with pytest.raises(BundleError, match=r"sha256 mismatch for generator\.onnx") as info:
        bundle.graph_source(bundle.generator.graphs["fp32"])
    assert "\n" not in str(info.value) and "re-export" in str(info.value)
    assert verify_checksums(load_bundle(folder, verify=False)) == ["generator.onnx"]
    assert load_bundle(folder, verify=False).graph_source("generator.onnx") == data.replace(two, three)
    (folder / "generator.onnx").write_bytes(data + b"\0")
    with pytest.raises(BundleError, match=r"'generator.onnx' has [0-9,]+ bytes, the manifest says"):
        load_bundle(folder)


@pytest.mark.parametrize("bad", ["../outside.onnx", "sub/../../outside.onnx"])
def test_dotdot_paths_refused(folder, bad):
    (folder.parent / "outside.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"climbs out"):
        write_manifest(folder, base_manifest(graphs={"fp32": {"file": bad}}))
    manifest = base_manifest(graphs={"fp32": {"file": bad}})
    manifest.update(schema_version=1, files={bad: "0" * 64})
    write_raw(folder, manifest)
    with pytest.raises(BundleError, match=r"climbs out"):
        load_bundle(folder)


def test_absolute_and_backslash_paths_refused(folder):
    absolute = str((folder / "generator.onnx").resolve())
    for bad, message in [(absolute, "absolute"), ("C:/x.onnx", "absolute"), ("sub\\x.onnx", "backslash")]:
        manifest = base_manifest(graphs={"fp32": {"file": bad}})
        with pytest.raises(BundleError, match=message):
            write_manifest(folder, manifest)
        manifest.update(schema_version=1, files={bad: "0" * 64})
        write_raw(folder, manifest)
        with pytest.raises(BundleError, match=message):
            load_bundle(folder)


def test_symlink_escaping_refused_inside_allowed(folder):
    outside = folder.parent / "elsewhere.onnx"
    onnx.save(tiny_graph(), outside)
    os.symlink(outside, folder / "link.onnx")
    with pytest.raises(BundleError, match="outside the bundle folder"):
        write_manifest(folder, base_manifest(graphs={"fp32": {"file": "link.onnx"}}))
    os.symlink(folder, folder / "loop")                       # a folder link back inside is fine
    write_manifest(folder, base_manifest(graphs={"fp32": {"file": "loop/generator.onnx"}}))
    assert load_bundle(folder).graph_path("generator").name == "generator.onnx"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["models"]["generator"]["graphs"]["fp32"]["file"] = "link.onnx"
    manifest["files"]["link.onnx"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    write_raw(folder, manifest)
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(folder)


def test_missing_and_unlisted_files(folder):
    write_manifest(folder, base_manifest())
    (folder / "generator.onnx").unlink()
    with pytest.raises(BundleError, match=r"'generator.onnx' listed in .* is missing"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="does not exist"):
        write_manifest(folder, base_manifest())
    onnx.save(tiny_graph(), folder / "generator.onnx")
    manifest = base_manifest()
    manifest.update(schema_version=1, files={})
    write_raw(folder, manifest)
    with pytest.raises(BundleError, match="not listed in the manifest's files"):
        load_bundle(folder)


def test_folder_manifest_json_and_schema_errors(tmp_path, folder):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(folder)
    (folder / MANIFEST_NAME).write_text('{"schema_version": 1,,}')
    with pytest.raises(BundleError, match=r"not valid JSON \(line 1"):
        load_bundle(folder)
    write_manifest(folder, base_manifest())
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    write_raw(folder, {**manifest, "schema_version": 2})
    with pytest.raises(BundleError, match="unknown schema_version 2; this galip reads schema 1"):
        load_bundle(folder)
    write_raw(folder, {**manifest, "files": {"generator.onnx": "abc"}})
    with pytest.raises(BundleError, match="sha256 hex"):
        load_bundle(folder)
    broken = json.loads(json.dumps(manifest))
    del broken["domains"]["T1"]["caption"]
    write_raw(folder, broken)
    with pytest.raises(BundleError, match=r"domains\.T1"):
        load_bundle(folder)


# ----------------------------------------------------------------------------- external data
def save_external(model: onnx.ModelProto, path, location: str) -> None:
    big = numpy_helper.from_array(np.arange(64, dtype=np.float32), "big")
    model.graph.initializer.append(big)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def test_external_data_listed_and_checked(folder):
    save_external(tiny_graph(), folder / "generator.onnx", "generator.weights")
    write_manifest(folder, base_manifest())
    bundle = load_bundle(folder)
    assert "generator.weights" in bundle.manifest["files"]
    assert bundle.generator.graphs["fp32"].external_data == ("generator.weights",)   # recorded by the writer
    assert bundle.graph_source(bundle.generator.graphs["fp32"]) == (folder / "generator.onnx").resolve()
    (folder / "generator.weights").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="generator.weights"):
        load_bundle(folder)                       # another size
    size = len(b"tampered")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    write_raw(folder, {**manifest, "sizes": {**manifest["sizes"], "generator.weights": size}})
    bundle = load_bundle(folder)
    with pytest.raises(BundleError, match="sha256 mismatch for generator.weights"):
        bundle.graph_source(bundle.generator.graphs["fp32"])


def test_external_data_escaping_refused(folder):
    (folder.parent / "secret.bin").write_bytes(b"\0" * 1024)
    model = tiny_graph()
    save_external(model, folder / "generator.onnx", "w.bin")
    write_manifest(folder, base_manifest())
    model = onnx.load(folder / "generator.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (folder / "generator.onnx").write_bytes(model.SerializeToString())
    assert onnx_external_locations((folder / "generator.onnx").read_bytes()) == ["../secret.bin"] * 3
    manifest = json.loads((folder / MANIFEST_NAME).read_text())     # sizes edited to match
    manifest["sizes"]["generator.onnx"] = (folder / "generator.onnx").stat().st_size
    write_raw(folder, manifest)
    bundle = load_bundle(folder)
    with pytest.raises(BundleError, match="sha256 mismatch for generator.onnx"):
        bundle.graph_source(bundle.generator.graphs["fp32"])
    bundle = load_bundle(folder, verify=False)    # the path check is never skipped
    with pytest.raises(BundleError, match="external data location '../secret.bin'.*climbs out"):
        bundle.graph_source(bundle.generator.graphs["fp32"])
    with pytest.raises(BundleError, match="climbs out"):
        write_manifest(folder, base_manifest())


def test_external_locations_in_subgraphs_and_garbage(folder):
    inner_tensor = numpy_helper.from_array(np.ones(4, np.float32), "c")
    inner_tensor.data_location = TensorProto.EXTERNAL
    inner_tensor.ClearField("raw_data")
    entry = inner_tensor.external_data.add()
    entry.key, entry.value = "location", "nested.bin"
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=inner_tensor)], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    data = helper.make_model(graph).SerializeToString()
    assert onnx_external_locations(data) == ["nested.bin", "nested.bin"]
    assert onnx_external_locations(tiny_graph().SerializeToString()) == []
    with pytest.raises(ValueError):
        onnx_external_locations(b"\xff\xff\xff")
    (folder / "generator.onnx").write_bytes(b"\x0a\xff\xff\xff\x0f")
    with pytest.raises(BundleError, match="not a valid ONNX protobuf"):
        write_manifest(folder, base_manifest())


def test_external_locations_from_onnx_save_model(folder):
    """onnx.save_model's location is reported and checksummed; sparse and training tensors are seen too."""
    (folder / "weights").mkdir()
    save_external(tiny_graph(), folder / "generator.onnx", "weights/generator.bin")
    data = (folder / "generator.onnx").read_bytes()
    assert onnx_external_locations(data) == ["weights/generator.bin"] * 3     # scale, col, big
    write_manifest(folder, base_manifest())
    assert "weights/generator.bin" in load_bundle(folder).manifest["files"]

    model = onnx.load_model_from_string(data)
    values = numpy_helper.from_array(np.arange(4, dtype=np.float32), "s")
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "i")
    sparse = model.graph.sparse_initializer.add()
    sparse.CopyFrom(helper.make_sparse_tensor(values, indices, [4]))
    train = model.training_info.add().initialization
    train.CopyFrom(helper.make_graph([], "init", [], [], [values]))
    for tensor in [sparse.values, sparse.indices, train.initializer[0]]:
        set_external_data(tensor, "extra.bin")
    found = sorted(onnx_external_locations(model.SerializeToString()))
    assert found == ["extra.bin"] * 3 + ["weights/generator.bin"] * 3


def test_model_domains_must_be_declared(folder):
    manifest = base_manifest(domains=["T1", "CT"])
    with pytest.raises(BundleError, match=r"every model domain should be one of domains \(T1, T2\), found \['CT'\]"):
        write_manifest(folder, manifest)
