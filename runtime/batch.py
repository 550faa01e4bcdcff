"""Many volumes with one :class:`~galip.runtime.api.Session`: inputs, cases, the threaded
read → translate → write pipeline, and the failure list.

Inputs (:func:`expand_inputs`): files, folders (their ``.nii``/``.nii.gz`` files), globs and
``@list.txt`` files (one input per line, ``#`` comments; relative lines are relative to
the list's folder), in the order given, folders and globs sorted, duplicates dropped.
Each input becomes a :class:`Case` with an output path and its provenance JSON beside it.
``--part K/N`` keeps cases ``K-1, K-1+N, ...`` of that list (deterministic, before
``--skip-existing`` drops the cases whose output and JSON both exist).

:func:`run_cases` runs the batch on three threads: a reader loads (and hashes) the next
volume while the main thread translates the current one, and a writer writes outputs, so
inference does not wait on disk. A failing case is one :class:`Outcome` line and the
batch goes on; :func:`write_failures` lists them in ``failures.tsv``.

Exit codes of a batch (galip-run, galip-bids):
    0   every case was translated (or skipped as already done)
    1   the batch ran and at least one case failed (each named in failures.tsv)
    2   nothing ran: a bad option, bundle, input list or output folder (one line)
    130 interrupted (Ctrl-C): finished outputs stay, the case in flight is not written
"""
from __future__ import annotations

import glob
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .api import Session, default_output
from .atomic import atomic_path
from .errors import ConfigError, GalipError, OutputError
from .provenance import sidecar_path

EXIT_OK, EXIT_CASES_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
NIFTI_SUFFIXES = (".nii.gz", ".nii")
FAILURES = "failures.tsv"


# ----------------------------------------------------------------------------- inputs
def _nifti_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(NIFTI_SUFFIXES)]
    if not files:
        raise ConfigError(f"{folder}: expected .nii or .nii.gz files in this folder, found none; "
                          "give another folder, files or a glob")
    return sorted(files)


def _expand_one(text: str) -> list[Path]:
    if glob.has_magic(text):
        matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
        if not matches:
            raise ConfigError(f"{text}: expected the pattern to match volumes, found no match; check it")
        return [q for m in map(Path, matches) for q in (_nifti_in(m) if m.is_dir() else [m])]
    path = Path(text).expanduser()
    return _nifti_in(path) if path.is_dir() else [path]   # a missing file fails as its own case


def _from_list(list_file: Path) -> list[Path]:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"@{list_file}: expected a readable UTF-8 text file listing inputs, found "
                          f"{getattr(exc, 'strerror', None) or exc}; check the path") from None
    found = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        item = Path(line).expanduser()
        found += _expand_one(str(item if item.is_absolute() else list_file.parent / item))
    return found


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Files, folders, globs and ``@list.txt`` → volume paths, in order, without duplicates."""
    found: list[Path] = []
    for item in items:
        text = str(item)
        found += _from_list(Path(text[1:]).expanduser()) if text.startswith("@") else _expand_one(text)
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    if not unique:
        raise ConfigError("expected at least one input volume, found none; give files, folders, globs or @list.txt")
    return list(unique.values())


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` → ``(K, N)`` with 1 ≤ K ≤ N; None passes through."""
    if text is None:
        return None
    try:
        k, n = (int(p) for p in text.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--part expects K/N with 1 <= K <= N (this process takes every N-th case "
                          f"from the K-th), got {text!r}") from None
    return k, n


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One volume of a batch: its place in the full input list, source and output paths;
    ``extra`` is merged into its provenance JSON (a BIDS sidecar's ``Sources``)."""

    index: int
    source: Path
    output: Path
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.output)

    @property
    def done(self) -> bool:
        """Output and provenance JSON both exist (the JSON is written last)."""
        return self.output.is_file() and self.sidecar.is_file()


Naming = Callable[[Path], tuple[Path, dict]]   # source → (output path, provenance extras)


def flat_naming(out_dir: Path, domain: str) -> Naming:
    """``OUT_DIR/<input stem>_<domain>.nii.gz`` (the single-volume name, in one folder)."""
    return lambda source: (out_dir / default_output(source, domain).name, {})


def plan_cases(sources: Sequence[Path], naming: Naming, part: tuple[int, int] | None = None) -> list[Case]:
    """Cases of ``sources`` (named by ``naming``), this ``part`` of them. ConfigError when two
    inputs would write the same output."""
    cases, seen = [], {}
    for index, source in enumerate(sources):
        output, extra = naming(source)
        key = os.path.normcase(os.path.abspath(output))
        if key in seen:
            raise ConfigError(f"inputs {seen[key]} and {source} would both write {output}; "
                              "rename one or translate them into different --out-dir folders")
        seen[key] = source
        cases.append(Case(index, source, output, extra))
    if part is not None:
        k, n = part
        cases = [case for case in cases if case.index % n == k - 1]
    return cases


def pending(cases: Sequence[Case], *, overwrite: bool, skip_existing: bool) -> tuple[list[Case], list[Case]]:
    """(cases to run, cases skipped as done). OutputError when outputs exist and neither
    ``overwrite`` nor ``skip_existing`` says what to do with them; with ``skip_existing``
    an output without its JSON (an interrupted write) is redone."""
    skipped = [case for case in cases if skip_existing and case.done]
    todo = [case for case in cases if not (skip_existing and case.done)]
    if not (overwrite or skip_existing):
        existing = [case.output for case in todo if case.output.exists()]
        if existing:
            raise OutputError(f"{existing[0]}: expected new outputs, found {len(existing)} existing; "
                              "pass --skip-existing to keep them (resume) or --overwrite to replace them")
    return todo, skipped


# ----------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    """What became of a case: ``written``, ``skipped`` or ``failed`` (``error`` one line)."""

    case: Case
    status: str
    error: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def one_line(exc: BaseException) -> str:
    """A user error's own message; anything else prefixed with its type. Never multi-line."""
    text = str(exc) if isinstance(exc, GalipError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def failed(case: Case, exc: BaseException, notes: list[str] | None = None) -> Outcome:
    return Outcome(case, "failed", one_line(exc), notes=list(notes or []))


def _write(session: Session, case: Case, source, result, overwrite: bool) -> None:
    case.output.parent.mkdir(parents=True, exist_ok=True)   # BIDS cases nest sub-*/anat/
    session.write(source, result, case.output, overwrite=overwrite, extra=case.extra)


def process_case(session: Session, case: Case, *, kind: str = "auto", overwrite: bool = False) -> Outcome:
    """Read, translate and write one case in this thread (a Ray actor's unit of work)."""
    started, notes = time.perf_counter(), []
    try:
        source = session.read(case.source, kind)
        notes = source.notes
        _write(session, case, source, session.run(source), overwrite)
    except Exception as exc:   # noqa: BLE001  one case's failure must not end the batch
        return failed(case, exc, notes)
    return Outcome(case, "written", seconds=time.perf_counter() - started, notes=notes)


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless ``stop`` is set first (so a full queue never blocks an interrupted batch)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def run_cases(session: Session, cases: Sequence[Case], *, kind: str = "auto", overwrite: bool = False,
              on_start: Callable[[Case], None] = lambda case: None,
              on_done: Callable[[Outcome], None] = lambda outcome: None,
              **progress) -> list[Outcome]:
    """Run ``cases`` with ``session`` (activated once): reader thread → this thread → writer thread.

    ``on_start(case)`` before a case's inference, ``on_done(outcome)`` when it is settled (from
    any thread); ``progress`` (``on_slices``, ``on_step``) goes to the translation. Returns the
    outcomes in case order. KeyboardInterrupt stops the threads and propagates.
    """
    if not cases:
        return []
    session.activate()
    loaded: queue.Queue = queue.Queue(maxsize=1)     # the next volume, read ahead
    translated: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    outcomes: dict[int, Outcome] = {}
    lock = threading.Lock()

    def settle(outcome: Outcome) -> None:
        with lock:
            outcomes[outcome.case.index] = outcome
        on_done(outcome)

    def reader() -> None:
        for case in cases:
            try:
                item = (case, session.read(case.source, kind), None)
            except Exception as exc:   # noqa: BLE001
                item = (case, None, exc)
            if not _put(loaded, item, stop):
                return
        _put(loaded, _END, stop)

    def writer() -> None:
        while (item := translated.get()) is not _END:
            case, source, result = item
            try:
                _write(session, case, source, result, overwrite)
            except Exception as exc:   # noqa: BLE001
                settle(failed(case, exc, source.notes))
                continue
            settle(Outcome(case, "written", seconds=source.seconds + result.seconds, notes=source.notes))

    threads = [threading.Thread(target=reader, name="galip-read", daemon=True),
               threading.Thread(target=writer, name="galip-write", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while (item := loaded.get()) is not _END:
            case, source, error = item
            if error is not None:
                settle(failed(case, error))
                continue
            on_start(case)
            try:
                result = session.run(source, **progress)
            except Exception as exc:   # noqa: BLE001
                settle(failed(case, exc, source.notes))
                continue
            translated.put((case, source, result))
    finally:
        stop.set()                # the reader gives up; the writer finishes what it holds
        translated.put(_END)
        for thread in threads:
            thread.join()
    return [outcomes[case.index] for case in cases if case.index in outcomes]


# ----------------------------------------------------------------------------- reporting
def failures_name(part: tuple[int, int] | None) -> str:
    """``failures.tsv``, or ``failures.part-K-of-N.tsv`` so shards sharing a folder do not clash."""
    return FAILURES if part is None else f"failures.part-{part[0]}-of-{part[1]}.tsv"


def write_failures(path: Path, outcomes: Sequence[Outcome]) -> Path | None:
    """``input<TAB>error`` per failed case (atomic); a stale list is removed when none failed."""
    rows = [(str(o.case.source), o.error) for o in outcomes if o.status == "failed"]
    if not rows:
        path.unlink(missing_ok=True)
        return None
    text = "input\terror\n" + "".join(f"{s}\t{e}".replace("\n", " ") + "\n" for s, e in
                                      ((src.replace("\t", " "), err.replace("\t", " ")) for src, err in rows))
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def exit_code(outcomes: Sequence[Outcome]) -> int:
    return EXIT_CASES_FAILED if any(o.status == "failed" for o in outcomes) else EXIT_OK
