"""Issue 16's fuzz tests: mutated NIfTI headers through the loader (and pipeline planning,
saving, the full CLI), mutated manifests through ``load_bundle`` and ``prepare``.

The two fuzzers run in their own processes (tests/fuzz_nifti.py, tests/fuzz_manifest.py), so
that their peak RSS is theirs alone and a hang cannot freeze the suite; each case also has
its own time limit (SIGALRM). Only ``GalipError`` may escape, no case may hang, and the
peak RSS stays under the memory budget plus the interpreter's own footprint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures_bundle import build_tiny_bundle
from fuzz_nifti import make_case, seeds
from galip.runtime import cli
from helpers_cli import snapshot

pytest.importorskip("onnxruntime")
HERE = Path(__file__).resolve().parent
BUDGET_MIB = 256
#: Peak RSS bound of a fuzz process: the memory budget it runs under plus ~128 MiB for the
#: interpreter, numpy, nibabel, scipy, onnx and onnxruntime themselves.
RSS_BOUND_MIB = BUDGET_MIB + 128
CASE_LIMIT_S = 5.0


def run_fuzzer(script: str, cases: int, seed: int) -> dict:
    command = [sys.executable, str(HERE / script), "--cases", str(cases), "--seed", str(seed),
               "--limit", str(CASE_LIMIT_S)]
    env = {**os.environ, "GALIP_MEMORY_BUDGET": f"{BUDGET_MIB}M", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60 + cases * CASE_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]     # nothing printed besides the summary
    summary = json.loads(done.stdout)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("escapes", "hangs")}))
    return summary


def check(summary: dict, cases: int, seconds: float | None) -> None:
    assert summary["cases"] == cases
    assert summary["escapes"] == [], summary["escapes"][:20]
    assert summary["hangs"] == []
    assert summary["slowest_case_s"] < CASE_LIMIT_S
    assert summary["peak_rss_mib"] < RSS_BOUND_MIB, summary
    assert sum(summary["outcomes"].values()) == cases
    if seconds is not None:
        assert summary["seconds"] <= seconds, summary


def test_nifti_header_fuzz_2000():
    summary = run_fuzzer("fuzz_nifti.py", 2000, seed=0)
    check(summary, 2000, seconds=60)
    assert summary["outcomes"]["InputError"] > 500 and summary["outcomes"]["loaded"] > 100   # both ways taken


def test_manifest_fuzz_2000():
    summary = run_fuzzer("fuzz_manifest.py", 2000, seed=0)
    check(summary, 2000, seconds=60)
    assert summary["outcomes"]["BundleError"] > 500 and summary["outcomes"]["accepted"] > 20


@pytest.mark.slow
def test_nifti_header_fuzz_10000():
    check(run_fuzzer("fuzz_nifti.py", 10_000, seed=1), 10_000, seconds=None)


@pytest.mark.slow
def test_manifest_fuzz_10000():
    check(run_fuzzer("fuzz_manifest.py", 10_000, seed=1), 10_000, seconds=None)


def cli_fuzz(tmp_path: Path, cases: int, seed: int) -> dict[int, int]:
    """Mutated volumes through the real galip-run: exit 0 with an output, or exit 2 with one
    error line (after any note/warning line, e.g. "reading as CT") and the folder unchanged;
    never a traceback. Returns {exit code: count}."""
    bundle = build_tiny_bundle(tmp_path / "bundle", diffusion_targets=())
    folder = tmp_path / "data"
    folder.mkdir()
    bases, codes = seeds(), {}
    for index in range(cases):
        name, blob, suffix = make_case(index, seed, bases)
        source = folder / f"case{suffix}"
        source.write_bytes(blob)
        before = snapshot(folder)
        result = CliRunner().invoke(cli.app, [str(source), "--to", "T2", "--bundle", str(bundle)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code in (0, 2), (name, result.exit_code, result.output, result.exception)
        assert "Traceback" not in result.output, (name, result.output)
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == (result.exit_code == 2), (name, result.stderr)     # one error line, or none
        assert all(line.startswith(("error:", "warning:", "note:")) for line in lines), (name, result.stderr)
        if result.exit_code == 2:
            assert snapshot(folder) == before, name
        else:
            (folder / "case_T2.nii.gz").unlink()
        codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
        source.unlink()
    return codes


def test_cli_fuzz_320(tmp_path):
    codes = cli_fuzz(tmp_path, 320, seed=0)
    assert codes.get(0, 0) > 20 and codes.get(2, 0) > 100, codes


@pytest.mark.slow
def test_cli_fuzz_2000(tmp_path):
    cli_fuzz(tmp_path, 2000, seed=1)
