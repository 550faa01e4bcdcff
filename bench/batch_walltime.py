"""Wall time of one batch ``galip-run`` against one ``galip-run`` per volume, and ``--ray local``.

Interleaved rounds (the order of the three modes rotates each round), every mode in its
own processes, the same inputs and settings; outputs compared byte for byte::

    python -m galip.bench.batch_walltime --inputs 'data/sub-*/sub-*_T1w.nii.gz' --work /tmp/bw --rounds 2

Prints one line per run and a JSON summary (median seconds per mode, ratios, identical).
"""
from __future__ import annotations

import argparse
import glob
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("batch", "separate", "ray")


def _galip_run() -> str:
    return str(Path(sys.executable).with_name("galip-run"))


def _run(mode: str, inputs: list[str], out: Path, extra: list[str]) -> float:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    if mode == "separate":
        for source in inputs:
            name = Path(source).name.replace(".nii.gz", "_T2.nii.gz")
            subprocess.run([_galip_run(), source, "--out", str(out / name), *extra],
                           check=True, stdout=subprocess.DEVNULL)
    else:
        ray = ["--ray", "local"] if mode == "ray" else []
        subprocess.run([_galip_run(), *inputs, "--out-dir", str(out), *ray, *extra],
                       check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.nii.gz"))
    return names == sorted(p.name for p in b.glob("*.nii.gz")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", required=True, help="glob of the source volumes")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("extra", nargs="*", help="galip-run options after --, e.g. -- --to T2 --threads 1")
    args = parser.parse_args()
    inputs = sorted(glob.glob(args.inputs))
    modes = args.modes.split(",")
    times: dict[str, list[float]] = {m: [] for m in modes}
    identical = True
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            seconds = _run(mode, inputs, args.work / mode, args.extra)
            times[mode].append(seconds)
            print(f"round {r + 1} {mode}: {len(inputs)} volumes in {seconds:.1f} s", flush=True)
        identical &= all(_same(args.work / modes[0], args.work / m) for m in modes[1:])
    median = {m: statistics.median(t) for m, t in times.items()}
    summary = {"volumes": len(inputs), "rounds": args.rounds, "seconds": times, "median_s": median,
               "ratio_to_batch": {m: median[m] / median["batch"] for m in modes if "batch" in median},
               "outputs_identical": identical, "options": args.extra}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
