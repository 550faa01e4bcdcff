"""Issue 16, interruption and races, with real galip-run processes.

A volume large enough that writing its output takes a noticeable moment; each test waits
until the run really is where it should be (signal handlers installed, the temporary
output file present) before it acts, so the timing is not left to chance.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fixtures_bundle import build_tiny_bundle, lps_affine, write_volume
from galip.runtime.atomic import STALE_AFTER_S, TEMP_TAG, atomic_path, clean_stale
from galip.runtime.errors import OutputError
from helpers_cli import start_run

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals, /proc and flock as on Linux")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    bundle = build_tiny_bundle(root / "bundle", diffusion_targets=())
    rng = np.random.default_rng(0)
    data = (rng.random((192, 192, 160), dtype=np.float32) * 1000 + 100).astype(np.float32)
    source = write_volume(root / "big.nii", data, lps_affine())
    return bundle, source


def temp_files(folder: Path, suffix: str = "") -> list[Path]:
    """galip temporary files in ``folder``; ``suffix=".nii.gz"``: only the output being written."""
    return [p for p in folder.iterdir() if TEMP_TAG in p.name and p.name.endswith(suffix)]


def wait_for(condition, process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended first: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def catches(pid: int, number: int) -> bool:
    """Whether process ``pid`` has a handler installed for signal ``number`` (/proc SigCgt)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(mask >> (number - 1) & 1)


def start(setup, out: Path, *extra):
    bundle, source = setup
    return start_run(source, "--to", "T2", "--bundle", bundle, "--out", out, "--batch", "32", *extra)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_while_the_output_is_being_written(tmp_path, setup, number):
    out = tmp_path / "o.nii.gz"
    process = start(setup, out)
    wait_for(lambda: temp_files(tmp_path, ".nii.gz"), process)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + number, stderr
    lines = stderr.strip().splitlines()
    assert lines == [f"interrupted by {signal.Signals(number).name}: stopped before the end, no partial file left"]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_before_the_output_exists(tmp_path, setup):
    out = tmp_path / "o.nii.gz"
    process = start(setup, out)
    wait_for(lambda: catches(process.pid, signal.SIGTERM), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and len(stderr.strip().splitlines()) == 1, stderr
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_a_stale_file_that_the_next_run_removes(tmp_path, setup):
    out = tmp_path / "o.nii.gz"
    process = start(setup, out)
    wait_for(lambda: temp_files(tmp_path, ".nii.gz"), process)
    process.kill()
    process.communicate(timeout=60)
    (stale,) = temp_files(tmp_path)
    assert stale.name.startswith(".o.nii.gz" + TEMP_TAG)       # recognisable: target name and tag
    old = time.time() - 10 * STALE_AFTER_S
    os.utime(stale, (old, old))
    again = start(setup, out)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.nii.gz"]
    assert nib.load(out).shape == (192, 192, 160)


def test_a_file_that_appears_at_out_while_writing_is_never_replaced(tmp_path, setup):
    out = tmp_path / "o.nii.gz"
    process = start(setup, out)
    wait_for(lambda: temp_files(tmp_path, ".nii.gz"), process)
    out.write_bytes(b"someone else's result")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    line, = stderr.strip().splitlines()
    assert "appeared while this run was writing" in line and "left untouched" in line
    assert out.read_bytes() == b"someone else's result" and temp_files(tmp_path) == []


def test_two_runs_started_together_never_replace_each_other(tmp_path, setup):
    out = tmp_path / "o.nii.gz"
    first, second = start(setup, out), start(setup, out)
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (line,) = next(err for code, err in results if code == 2).strip().splitlines()
    assert "--overwrite" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.nii.gz"]
    assert nib.load(out).shape == (192, 192, 160)


# ----------------------------------------------------------------------------- the mechanism, in-process
def test_clean_stale_spares_live_and_young_files(tmp_path):
    target = tmp_path / "x.nii.gz"
    old = time.time() - 10 * STALE_AFTER_S
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"being written")
        os.utime(tmp, (old, old))
        assert clean_stale(tmp_path) == []           # locked by a live writer (this process)
        dead = tmp_path / f".y.nii.gz{TEMP_TAG}abc.nii.gz"
        dead.write_bytes(b"left by a SIGKILL")
        young = tmp_path / f".z.nii.gz{TEMP_TAG}def.nii.gz"
        young.write_bytes(b"just created")
        os.utime(dead, (old, old))
        assert clean_stale(tmp_path) == [dead]
        assert young.exists() and tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.nii.gz", young.name])


def test_no_clobber_and_overwrite(tmp_path):
    target = tmp_path / "x.txt"
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_text("mine")
            target.write_text("theirs")
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
    with atomic_path(target) as tmp:      # the default replaces, as before
        tmp.write_text("mine")
    assert target.read_text() == "mine"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "y.txt", overwrite=False) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_critical_defers_signals_only_in_the_main_thread():
    """A batch writer thread must never inherit a held-back signal (it would die with it
    while the main thread waits on it): outside the main thread critical() is a no-op."""
    import threading

    from galip.runtime import signals
    seen = []

    def worker():
        with signals.critical():
            seen.append(signals._critical["depth"])

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [0]
    with signals.critical():
        assert signals._critical["depth"] == 1
    assert signals._critical["depth"] == 0
