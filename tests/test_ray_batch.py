"""galip-run --ray on a real local Ray instance (2 CPUs): Ray Data, an actor pool holding
activated bundles, outputs written by the actors; identical to the local batch."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures_bundle import build_tiny_bundle, oblique_affine, phantom_volume, write_volume
from galip.runtime.cli import app

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("onnxruntime")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def test_ray_batch_equals_the_local_batch(tmp_path, bundle, local_ray):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [write_volume(inputs / f"sub-{i:02d}_T1w.nii.gz", phantom_volume(seed=i), oblique_affine()) for i in range(4)]
    (inputs / "sub-09_T1w.nii.gz").write_bytes(good[0].read_bytes()[:300])      # truncated
    common = ("--to", "T2", "--bundle", bundle, "--batch", 4)
    local = run(inputs, *common, "--out-dir", tmp_path / "local")
    remote = run(inputs, *common, "--out-dir", tmp_path / "ray", "--ray", "auto", "--workers", 2)
    assert local.exit_code == 1, local.output
    assert remote.exit_code == 1, remote.output
    assert "on Ray (auto)" in remote.output and "translated 4 of 5 volume(s)" in remote.output
    assert (tmp_path / "local" / "failures.tsv").read_text() == (tmp_path / "ray" / "failures.tsv").read_text()
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir()) and len(names) == 9
    for name in names:
        if name.endswith(".nii.gz"):
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    record = json.loads((tmp_path / "ray" / "sub-00_T1w_T2.json").read_text())
    assert record["backend"] == "onnxruntime-cpu" and record["output"] == str((tmp_path / "ray" / "sub-00_T1w_T2.nii.gz").resolve())
    assert record["settings"]["threads"] == 1          # one CPU per actor


def test_ray_resumes_with_skip_existing(tmp_path, bundle, local_ray):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        write_volume(inputs / f"sub-{i:02d}_T1w.nii.gz", phantom_volume(seed=i), oblique_affine())
    out = tmp_path / "out"
    assert run(inputs, "--to", "T1", "--bundle", bundle, "--out-dir", out, "--part", "1/2").exit_code == 0
    result = run(inputs, "--to", "T1", "--bundle", bundle, "--out-dir", out, "--skip-existing", "--ray", "auto")
    assert result.exit_code == 0, result.output
    assert "1 volume(s) to translate to T1 by generator on Ray (auto) (1 already done)" in result.output
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sub-00_T1w_T1.nii.gz", "sub-01_T1w_T1.nii.gz"]
    done = run(inputs, "--to", "T1", "--bundle", bundle, "--out-dir", out, "--skip-existing", "--ray", "auto")
    assert done.exit_code == 0 and "translated 0 of 0 volume(s)" in done.output
