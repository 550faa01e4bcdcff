"""The loop both fuzzers share: run each case under a time limit, sort what happens into
outcomes, escapes and hangs, and report a JSON summary with the process's peak RSS."""
from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
import traceback
from typing import Callable, Iterable


class CaseTimeout(BaseException):
    """Raised by SIGALRM when one case runs past its limit (not an Exception: nothing swallows it)."""


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: VmHWM (reset by exec, unlike ru_maxrss, which keeps
    the peak of the parent that forked us), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def drive(cases: Iterable[tuple[str, Callable[[], str]]], limit: float) -> dict:
    """Run every ``(name, call)``; ``call()`` returns its outcome (e.g. the GalipError class
    name). Any other exception is an escape, a call past ``limit`` seconds a hang."""
    outcomes: dict[str, int] = {}
    escapes, hangs = [], []
    slowest = 0.0

    def alarm(signum, frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    started = time.perf_counter()
    try:
        for name, call in cases:
            begin = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                outcome = call()
            except CaseTimeout:
                hangs.append(name)
                outcome = "hang"
            except Exception as error:   # what a fuzzer exists to find
                where = traceback.extract_tb(error.__traceback__)[-1]
                escapes.append(f"{name}: {type(error).__name__}: {' '.join(str(error).split())[:200]} "
                               f"@ {where.filename.rsplit('/', 1)[-1]}:{where.lineno}")
                outcome = "escape"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - begin)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {"cases": sum(outcomes.values()), "outcomes": outcomes, "escapes": escapes, "hangs": hangs,
            "slowest_case_s": round(slowest, 3), "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": peak_rss_mib()}


def main(fuzz: Callable[[int, int, float], dict], description: str, argv: list[str] | None = None) -> None:
    """``--cases N --seed S --limit SECONDS``; prints ``fuzz(N, S, SECONDS)`` as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=float, default=5.0, help="seconds per case before it is a hang")
    args = parser.parse_args(argv)
    json.dump({**fuzz(args.cases, args.seed, args.limit), "seed": args.seed}, sys.stdout)
