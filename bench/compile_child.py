"""``torch.compile`` timings in a child process, so a compilation can be stopped at a budget.

Inductor compiles the 13.2M-parameter generator in minutes on 2 busy cores (seconds with a
warm cache in ``$TORCHINDUCTOR_CACHE_DIR``), and a compilation cannot be interrupted from
inside the process. :func:`run_compiled` starts ``python -m galip.bench.compile_child
SPEC.json`` in its own process group, waits at most ``budget_s`` and kills that group when
the budget is spent; the child compiles, times each batch of ``inputs.npz`` and writes
``timings.json`` + ``outputs.npz`` for the parent to compare against eager PyTorch.

Only this module's ``main`` runs in the child; it sets the inductor environment before
torch is imported (one compile thread: no worker pool to leave behind).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_compiled(spec: dict, workdir: Path, budget_s: float) -> tuple[dict | None, str]:
    """Run the child on ``spec``; returns (timings dict or None, reason when None).

    ``spec``: checkpoint or manifest_entry (the generator), inputs (npz path with arrays
    ``s<size>_b<batch>`` + ``domain_s<size>_b<batch>``), cases (those keys, in order),
    device, threads, warmup, repeats, budget_per_case_s. The returned dict maps each
    finished case key to {seconds, warmup, first_call_s} (first call = compilation).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(workdir)}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = open(workdir / "child.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "galip.bench.compile_child", str(spec_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    timed_out = False
    try:
        code = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # the child's own process group only
        code, timed_out = proc.wait(), True
    finally:
        log.close()
    result = workdir / "timings.json"
    budget_note = (f"did not finish within the {budget_s:.0f} s budget (inductor compiles this model in "
                   f"minutes on few busy cores; a warm cache makes it seconds); raise --compile-budget")
    if not result.is_file():
        if timed_out:
            return None, "compilation " + budget_note
        tail = [ln for ln in (workdir / "child.log").read_text(errors="replace").splitlines() if ln.strip()]
        return None, f"torch.compile failed (exit {code}): {tail[-1][:240] if tail else 'no output'}"
    data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - started
    data["unfinished"] = budget_note if timed_out else (f"exit {code}" if code else "")
    return data, ""


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    import torch

    from galip.bench.harness import measure
    from galip.bench.workload import eager_generator

    torch.set_num_threads(int(spec["threads"]))
    device, out_dir = spec["device"], Path(spec["out"])
    checkpoint = Path(spec["checkpoint"]) if spec.get("checkpoint") else None
    module = eager_generator(checkpoint, spec.get("manifest_entry")).to(device).eval()
    inputs = np.load(spec["inputs"], allow_pickle=False)
    started = time.perf_counter()
    compiled = torch.compile(module)
    sync = torch.cuda.synchronize if device == "cuda" else None
    timings, outputs = {}, {}
    with torch.inference_mode():
        for key in spec["cases"]:                  # "s<size>_b<batch>"
            image = torch.from_numpy(inputs[key]).to(device)
            domain = torch.from_numpy(inputs[f"domain_{key}"]).to(device)
            first = time.perf_counter()
            compiled(image, domain)                # compiles (or recompiles for a new shape)
            if sync:
                sync()
            compile_s = time.perf_counter() - first
            timing, out = measure(lambda: compiled(image, domain), warmup=max(0, int(spec["warmup"]) - 1),
                                  repeats=int(spec["repeats"]), budget_s=spec.get("budget_per_case_s"),
                                  sync=sync)
            timings[key] = {"seconds": list(timing.seconds), "warmup": timing.warmup + 1,
                            "first_call_s": compile_s}
            outputs[key] = out.float().cpu().numpy()
            # Written after every case (atomically): a budget that runs out later keeps these.
            np.savez(out_dir / "outputs.tmp.npz", **outputs)
            os.replace(out_dir / "outputs.tmp.npz", out_dir / "outputs.npz")
            (out_dir / "timings.tmp.json").write_text(json.dumps({**timings, "total_s": time.perf_counter() - started}))
            os.replace(out_dir / "timings.tmp.json", out_dir / "timings.json")


if __name__ == "__main__":
    main(sys.argv[1])
