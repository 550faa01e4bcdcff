"""galip-bids on a small generated BIDS tree (pybids finds the inputs; tiny onnx bundle).

File names are checked against the derivative rules of the official BIDS schema (shipped
by bidsschematools, a pybids dependency): the legacy npm bids-validator 1.x rejects every
derivative file and the schema-based validator (Deno) does not install here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_bundle import build_tiny_bundle, oblique_affine, phantom_volume, write_volume
from galip.runtime.bids import app, derivative_name
from galip.runtime.bundle import sha256_file
from galip.runtime.provenance import FIELDS

pytest.importorskip("bids")
pytest.importorskip("onnxruntime")

SOURCES = ["sub-01/anat/sub-01_T1w.nii.gz",
           "sub-02/ses-1/anat/sub-02_ses-1_run-1_T1w.nii.gz",
           "sub-03/anat/sub-03_acq-fast_T1w.nii"]
OTHERS = ["sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz"]     # a T2w: not a --from T1w input


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "raw"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny raw", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    for i, relative in enumerate(SOURCES + OTHERS):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_volume(path, phantom_volume(seed=i), oblique_affine())
    return root


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def schema_matches(relative: str) -> bool:
    """Does ``relative`` match a derivative imaging file rule of the BIDS schema?"""
    from bidsschematools import rules, schema
    bids_schema = schema.load_schema()
    patterns = rules.regexify_filename_rules(bids_schema.rules.files.deriv.imaging, bids_schema, level=1)
    return any(re.fullmatch(p["regex"], relative) for p in patterns)


def test_derivative_names():
    assert derivative_name(Path("sub-01_ses-1_run-2_T1w.nii.gz"), "T2w") == "sub-01_ses-1_run-2_desc-galip_T2w.nii.gz"
    assert derivative_name(Path("sub-01_desc-orig_T1w.nii"), "PDw") == "sub-01_desc-galip_PDw.nii.gz"
    assert schema_matches("sub-01/ses-1/anat/sub-01_ses-1_run-2_desc-galip_T2w.nii.gz")
    assert not schema_matches("sub-01/ses-1/anat/sub-01_run-2_ses-1_desc-galip_T2w.nii.gz")   # entity order
    assert not schema_matches("sub-01/anat/sub-01_desc-galip_T2x.nii.gz")               # suffix


def test_bids_app_writes_a_derivative_dataset(tmp_path, dataset, bundle):
    out = tmp_path / "derivatives" / "galip"
    result = run(dataset, out, "participant", "--to", "T2", "--bundle", bundle)
    assert result.exit_code == 0, result.output
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "galip" and description["GeneratedBy"][0]["Version"]
    assert description["BIDSVersion"] and description["DatasetLinks"]["raw"] == dataset.resolve().as_uri()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted([f"{Path(s).parent.as_posix()}/{derivative_name(Path(s), 'T2w')}" for s in SOURCES]
                      + [f"{Path(s).parent.as_posix()}/{derivative_name(Path(s), 'T2w')[:-7]}.json" for s in SOURCES]
                      + ["dataset_description.json", ".bidsignore"])
    assert written == expected
    for relative in written:
        if relative.startswith("sub-"):
            assert schema_matches(relative), relative
    for source in SOURCES:
        output = out / Path(source).parent / derivative_name(Path(source), "T2w")
        sidecar = json.loads(output.with_name(output.name[:-7] + ".json").read_text())
        assert sidecar["Sources"] == [f"bids:raw:{source}"]
        assert set(FIELDS) <= set(sidecar) and sidecar["target"] == "T2"
        assert sidecar["source"]["sha256"] == sha256_file(dataset / source)
        image, reference = nib.load(str(output)), nib.load(str(dataset / source))
        assert image.shape == reference.shape and np.allclose(image.affine, reference.affine, atol=1e-5)


def test_participant_label_and_errors(tmp_path, dataset, bundle):
    out = tmp_path / "out"
    result = run(dataset, out, "participant", "--participant-label", "sub-02", "--participant-label", "03",
                 "--to", "PD", "--bundle", bundle)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.rglob("*.nii.gz")) == [
        "sub-02_ses-1_run-1_desc-galip_PDw.nii.gz", "sub-03_acq-fast_desc-galip_PDw.nii.gz"]
    resumed = run(dataset, out, "participant", "--to", "PD", "--bundle", bundle, "--skip-existing")
    assert resumed.exit_code == 0 and "1 volume(s) to translate" in resumed.output and "2 already done" in resumed.output
    cases = [
        ((dataset, out, "group", "--to", "T2"), "only the participant level"),
        ((dataset, out, "participant", "--to", "T2", "--participant-label", "09"), "not in"),
        ((dataset, out, "participant", "--to", "T2", "--from", "FLAIR"), "found none"),
        ((tmp_path / "nothing", out, "participant", "--to", "T2"), "expected a BIDS dataset"),
        ((dataset, out, "participant", "--to", "T2", "--out-dir", tmp_path), "drop --out"),
        ((dataset, dataset, "participant", "--to", "T2"), "raw dataset"),      # never into the raw data
        ((dataset, dataset.parent, "participant", "--to", "T2"), "raw dataset"),
    ]
    raw_description = (dataset / "dataset_description.json").read_bytes()
    for args, message in cases:
        result = run(*args, "--bundle", bundle)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert (dataset / "dataset_description.json").read_bytes() == raw_description
