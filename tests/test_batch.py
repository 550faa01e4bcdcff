"""galip-run batch mode and the Session API on the tiny onnx.helper bundle (onnxruntime CPU).

The tiny generator's T1 is the identity, so batch outputs are compared with single-volume
runs and with the API byte for byte; the mixed folder holds a truncated .nii.gz, a text
file and a 2-D image, which must each fail as one line while the others translate.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_bundle import build_tiny_bundle, oblique_affine, phantom_volume, write_volume
from galip.runtime import batch as B
from galip.runtime.api import Session
from galip.runtime.bundle import sha256_file
from galip.runtime.cli import app
from galip.runtime.errors import ConfigError
from galip.runtime.provenance import FIELDS

pytest.importorskip("onnxruntime")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def volumes(folder: Path, n: int, prefix: str = "sub") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_volume(folder / f"{prefix}-{i:02d}_T1w.nii.gz", phantom_volume(seed=i), oblique_affine())
            for i in range(n)]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- failures
def test_mixed_folder_translates_the_good_ones_and_lists_the_bad(tmp_path, bundle):
    good = volumes(tmp_path / "in", 3)
    bad = tmp_path / "in" / "sub-09_T1w.nii.gz"
    bad.write_bytes(good[0].read_bytes()[:300])                       # truncated gzip
    flat = tmp_path / "in" / "sub-08_T1w.nii"
    nib.save(nib.Nifti1Image(np.ones((5, 6), np.float32), np.eye(4)), str(flat))   # 2-D image
    (tmp_path / "in" / "notes.txt").write_text("not an input (wrong suffix, skipped by folder expansion)")
    before = {p.name: sha(p) for p in (tmp_path / "in").iterdir()}
    out = tmp_path / "out"
    result = run(tmp_path / "in", "--to", "T1", "--bundle", bundle, "--out-dir", out)
    assert result.exit_code == B.EXIT_CASES_FAILED, result.output
    assert "5 volume(s) to translate" in result.output
    assert "translated 3 of 5 volume(s)" in result.output
    failed_lines = [line for line in result.output.splitlines() if line.startswith("failed: ")]
    assert len(failed_lines) == 2 and "Traceback" not in result.output
    rows = (out / "failures.tsv").read_text().splitlines()
    assert rows[0] == "input\terror"
    assert sorted(Path(r.split("\t")[0]).name for r in rows[1:]) == [flat.name, bad.name]
    assert all(len(r.split("\t")) == 2 and r.split("\t")[1] for r in rows[1:])
    # Outputs and their provenance for the good ones only: no partial or temporary file.
    expected = sorted([f"sub-{i:02d}_T1w_T1.{ext}" for i in range(3) for ext in ("json", "nii.gz")] + ["failures.tsv"])
    assert listing(out) == expected
    assert {p.name: sha(p) for p in (tmp_path / "in").iterdir()} == before     # inputs untouched


def test_all_good_batch_exits_0_and_removes_a_stale_failure_list(tmp_path, bundle):
    volumes(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "failures.tsv").write_text("input\terror\nold\tstale\n")
    result = run(tmp_path / "in", "--to", "T1", "--bundle", bundle, "--out-dir", out)
    assert result.exit_code == B.EXIT_OK, result.output
    assert not (out / "failures.tsv").exists()


def test_setup_errors_exit_2_before_any_case(tmp_path, bundle):
    sources = volumes(tmp_path / "in", 2)
    out = tmp_path / "out"
    cases = [
        (["--to", "T1", "--bundle", bundle], "need --out-dir"),                              # no --out-dir
        (["--to", "XX", "--bundle", bundle, "--out-dir", out], "not a domain"),
        (["--to", "T1", "--bundle", bundle, "--out-dir", out, "--part", "3/2"], "--part expects K/N"),
        (["--to", "T1", "--bundle", bundle, "--out-dir", out, "--out", tmp_path / "x.nii.gz"], "--out works with one input"),
        (["--to", "T1", "--bundle", bundle, "--out-dir", out, "--workers", "2"], "add --ray"),
    ]
    for args, message in cases:
        result = run(*sources, *args)
        assert result.exit_code == B.EXIT_USAGE, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    result = run(tmp_path / "in" / "*.nii.gz", "--to", "T1", "--bundle", bundle, "--out-dir", out)
    assert result.exit_code == 0, result.output
    again = run(tmp_path / "in", "--to", "T1", "--bundle", bundle, "--out-dir", out)   # outputs exist
    assert again.exit_code == B.EXIT_USAGE and "--skip-existing" in again.output


def test_two_inputs_with_one_output_name_are_refused(tmp_path, bundle):
    a = volumes(tmp_path / "a", 1)[0]
    b = volumes(tmp_path / "b", 1)[0]
    result = run(a, b, "--to", "T1", "--bundle", bundle, "--out-dir", tmp_path / "out")
    assert result.exit_code == B.EXIT_USAGE and "would both write" in result.output


# ----------------------------------------------------------------------------- selection
def test_expand_inputs_files_folders_globs_and_lists(tmp_path):
    a = volumes(tmp_path / "a", 3)
    b = volumes(tmp_path / "b", 2, prefix="x")
    (tmp_path / "a" / ".hidden_T1w.nii.gz").write_bytes(b"")       # temporary files are not inputs
    listed = tmp_path / "lists" / "cases.txt"
    listed.parent.mkdir()
    listed.write_text(f"# cases\n\n../b/x-01_T1w.nii.gz\n{b[0]}\n{tmp_path / 'a' / 'sub-0[12]_T1w.nii.gz'}\n")
    assert B.expand_inputs([tmp_path / "a"]) == a
    assert B.expand_inputs([str(tmp_path / "b" / "*.nii.gz"), a[0], tmp_path / "a"]) == b + a
    assert [p.resolve() for p in B.expand_inputs([f"@{listed}"])] == [b[1], b[0], a[1], a[2]]
    missing = tmp_path / "missing.nii.gz"
    assert B.expand_inputs([missing]) == [missing]            # fails later, as its own case
    for bad in ([str(tmp_path / "none" / "*.nii")], [f"@{tmp_path / 'nolist.txt'}"], [tmp_path / "lists"]):
        with pytest.raises(ConfigError):
            B.expand_inputs(bad)


def test_part_takes_every_nth_case_and_shards_cover_the_batch(tmp_path, bundle):
    sources = volumes(tmp_path / "in", 5)
    naming = B.flat_naming(tmp_path / "out", "T1")
    shares = [[c.index for c in B.plan_cases(sources, naming, (k, 2))] for k in (1, 2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert B.parse_part("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1", "a/b", "1/2/3"):
        with pytest.raises(ConfigError):
            B.parse_part(bad)
    out = tmp_path / "out"
    for k in (1, 2):
        result = run(tmp_path / "in", "--to", "T1", "--bundle", bundle, "--out-dir", out, "--part", f"{k}/2")
        assert result.exit_code == 0, result.output
        assert f"part {k}/2 of 5 inputs" in result.output
        if k == 1:
            assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"sub-{i:02d}_T1w_T1.nii.gz" for i in (0, 2, 4)]
    assert len(list(out.glob("*.nii.gz"))) == 5


def test_skip_existing_resumes_only_what_is_missing(tmp_path, bundle):
    volumes(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "--to", "T1", "--bundle", bundle, "--out-dir", out).exit_code == 0
    kept = out / "sub-00_T1w_T1.nii.gz"
    stamp = kept.stat().st_mtime_ns
    (out / "sub-01_T1w_T1.nii.gz").unlink()                    # never written
    (out / "sub-02_T1w_T1.json").unlink()                      # interrupted before its JSON
    result = run(tmp_path / "in", "--to", "T1", "--bundle", bundle, "--out-dir", out, "--skip-existing")
    assert result.exit_code == 0, result.output
    assert "2 volume(s) to translate to T1 by generator (1 already done)" in result.output
    assert kept.stat().st_mtime_ns == stamp
    assert all((out / f"sub-{i:02d}_T1w_T1.{ext}").is_file() for i in range(3) for ext in ("json", "nii.gz"))
    again = run(tmp_path / "in", "--to", "T1", "--bundle", bundle, "--out-dir", out, "--skip-existing")
    assert again.exit_code == 0 and "0 volume(s) to translate to T1 by generator (3 already done)" in again.output


# ----------------------------------------------------------------------------- results
def test_batch_equals_single_runs_and_the_api(tmp_path, bundle):
    sources = volumes(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert run(*sources, "--to", "T2", "--bundle", bundle, "--out-dir", out, "--batch", 3).exit_code == 0
    with Session("T2", bundle, batch=3) as session:
        for source in sources:
            single = tmp_path / f"single_{source.name}"
            assert run(source, "--to", "T2", "--bundle", bundle, "--out", single, "--batch", 3).exit_code == 0
            batched = out / source.name.replace(".nii.gz", "_T2.nii.gz")
            assert sha(batched) == sha(single)
            image = nib.load(str(source))
            result = session.translate(np.asarray(image.dataobj), image.affine)
            np.testing.assert_array_equal(result.data, np.asarray(nib.load(str(batched)).dataobj))


def test_provenance_json_fields(tmp_path, bundle):
    sources = volumes(tmp_path / "in", 1)
    out = tmp_path / "out"
    result = run(*sources, "--to", "T2", "--bundle", bundle, "--out-dir", out, "--model", "diffusion",
                 "--steps", "2", "--seed", "5")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sub-00_T1w_T2.json").read_text())
    assert tuple(record) == FIELDS
    assert record["source"] == {"path": str(sources[0].resolve()), "sha256": sha256_file(sources[0])}
    assert record["output"] == str((out / "sub-00_T1w_T2.nii.gz").resolve())
    assert record["bundle"] == {"name": "tiny", "path": str(bundle.resolve()),
                                "manifest_sha256": sha256_file(bundle / "manifest.json")}
    assert (record["model"], record["target"], record["source_kind"]) == ("diffusion", "T2", "mri")
    assert (record["backend"], record["precision"]) == ("onnxruntime-cpu", "fp32")
    assert record["sampler"] == {"name": "ddim", "steps": 2, "eta": 0.0, "seed": 5}
    assert record["settings"]["steps"] == 2 and record["galip_version"]
    assert set(record["seconds"]) == {"read", "translate", "write"}
    assert record["wall_seconds"] == pytest.approx(sum(record["seconds"].values()), abs=1e-3)


def test_session_activates_the_runners_once_for_many_volumes(tmp_path, bundle):
    session = Session("T2", bundle)
    made = []
    factory = session.translator.factory
    session.translator.factory = lambda: made.append(1) or factory()
    with session:
        first = [session.translate(phantom_volume(seed=i), oblique_affine()).data for i in range(3)]
        runner = session._active.factory().runner
        assert runner.is_active and len(runner.inference_times) == 3 * 2   # 9 slices, batch 8: 2 calls each
    assert made == [1] and not runner.is_active
    fresh = Session("T2", bundle)      # not entered: activates on first use, same answer
    np.testing.assert_array_equal(fresh.translate(phantom_volume(seed=0), oblique_affine()).data, first[0])
    fresh.close()
    with pytest.raises(ConfigError, match="unknown setting"):
        Session("T2", bundle, batchsize=3)


def test_session_checks_the_output_name_before_any_inference(tmp_path, bundle):
    from galip.runtime.errors import OutputError
    source = write_volume(tmp_path / "s.nii.gz", phantom_volume(), oblique_affine())
    taken = tmp_path / "taken.nii.gz"
    taken.write_bytes(b"keep")
    with Session("T2", bundle) as session:
        session.run = lambda *a, **k: pytest.fail("inference ran before the output was checked")
        for out, message in ((tmp_path / "x.png", "ending in"), (taken, "existing")):
            with pytest.raises(OutputError, match=message):
                session.translate_file(source, out)
    assert taken.read_bytes() == b"keep"
