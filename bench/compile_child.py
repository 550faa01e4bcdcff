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

    ``spec``: kind ("generator"), checkpoint or manifest_entry, inputs (npz path with
    ``b<batch>`` arrays + ``domain_b<batch>``), batches, device, threads, warmup, repeats.
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
    try:
        code = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # the child's own process group only
        proc.wait()
        return None, (f"compilation did not finish within the {budget_s:.0f} s budget (inductor compiles "
                      f"this model in minutes on few busy cores; a warm cache makes it seconds); "
                      f"raise --compile-budget")
    finally:
        log.close()
    result = workdir / "timings.json"
    if code != 0 or not result.is_file():
        tail = [ln for ln in (workdir / "child.log").read_text(errors="replace").splitlines() if ln.strip()]
        return None, f"torch.compile failed (exit {code}): {tail[-1][:240] if tail else 'no output'}"
    data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - started
    return data, ""


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    import torch

    from galip.bench.harness import measure
    from galip.bench.workload import eager_generator

    torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    checkpoint = Path(spec["checkpoint"]) if spec.get("checkpoint") else None
    module = eager_generator(checkpoint, spec.get("manifest_entry")).to(device).eval()
    inputs = np.load(spec["inputs"], allow_pickle=False)
    started = time.perf_counter()
    compiled = torch.compile(module)
    sync = torch.cuda.synchronize if device == "cuda" else None
    timings, outputs = {}, {}
    with torch.inference_mode():
        for batch in spec["batches"]:
            image = torch.from_numpy(inputs[f"b{batch}"]).to(device)
            domain = torch.from_numpy(inputs[f"domain_b{batch}"]).to(device)
            if not timings:   # the first call compiles
                compiled(image, domain)
                if sync:
                    sync()
                timings["compile_s"] = time.perf_counter() - started
            timing, out = measure(lambda: compiled(image, domain), warmup=int(spec["warmup"]),
                                  repeats=int(spec["repeats"]), budget_s=spec.get("budget_per_case_s"),
                                  sync=sync)
            timings[str(batch)] = {"seconds": list(timing.seconds), "warmup": timing.warmup}
            outputs[f"b{batch}"] = out.float().cpu().numpy()
    np.savez(Path(spec["out"]) / "outputs.npz", **outputs)
    (Path(spec["out"]) / "timings.json").write_text(json.dumps(timings))


if __name__ == "__main__":
    main(sys.argv[1])
