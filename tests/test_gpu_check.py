"""``make gpu-check`` (bench/gpu_check.py): one PASS/FAIL/SKIP line per item, exit 0 without a GPU."""
import re
import subprocess
import sys
from pathlib import Path

from galip.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_from_the_checkout():
    """Every item prints one line; here (no GPU) they SKIP with a reason and the exit code is 0."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    items = [line for line in lines[1:] if re.match(r"(PASS|FAIL|SKIP) ", line)]
    assert [line.split()[1].rstrip(":") for line in items] == [name for name, _ in gpu_check.ITEMS]
    assert not [line for line in items if line.startswith("FAIL")]
    for line in items:
        if line.startswith("SKIP"):
            assert re.match(r"SKIP [\w-]+: \S.+ \[\d+\.\d s\]$", line), line


def test_a_failing_item_is_one_fail_line_and_exit_1(monkeypatch, capsys):
    def broken(work):
        raise AssertionError("max |dLMI| 3.2e-04 (tolerance 1e-05)\nsecond line")

    def absent(work):
        raise gpu_check.Skip("no CUDA GPU visible to CuPy")
    monkeypatch.setattr(gpu_check, "ITEMS", [("broken", broken), ("absent", absent)])
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("FAIL broken: AssertionError: max |dLMI| 3.2e-04 (tolerance 1e-05) [")
    assert out[2].startswith("SKIP absent: no CUDA GPU visible to CuPy [")
    assert gpu_check.main(["absent"]) == 0
