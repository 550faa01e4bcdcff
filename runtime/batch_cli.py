"""``galip-run`` with many inputs: the command-line face of :mod:`galip.runtime.batch`
(local, threaded) and :mod:`galip.runtime.ray_batch` (``--ray``).

Batch mode starts when galip-run gets more than one input, a folder, a glob, an
``@list.txt``, ``--out-dir``, or any batch option. One progress bar over the cases with an
ETA (slices and diffusion steps of the current case below it), one line per case (on
stdout when piped, failures on stderr; all above the bar on a terminal), ``failures.tsv``
in ``--out-dir``; exit codes in :mod:`galip.runtime.batch`.
"""
from __future__ import annotations

import glob
import time
from pathlib import Path
from typing import Sequence

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .api import Session
from .batch import (EXIT_CASES_FAILED, EXIT_INTERRUPTED, Case, Outcome, exit_code, expand_inputs, failures_name, flat_naming,
                    parse_part, pending, plan_cases, run_cases, write_failures)
from .cli_support import err_console, user_errors
from .errors import ConfigError, GalipError, OutputError
from .pipeline import Settings
from .signals import Interrupted


def is_batch(inputs: Sequence[Path | str], out_dir: Path | None, *options) -> bool:
    """More than one input, a folder / glob / @list, ``--out-dir`` or any batch option set."""
    if len(inputs) != 1 or out_dir is not None or any(o is not None and o is not False for o in options):
        return True
    text = str(inputs[0])
    return text.startswith("@") or glob.has_magic(text) or Path(text).is_dir()


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)


def _say(text: str, *, error: bool = False) -> None:
    # While the bar is drawn (stderr is a terminal) every line goes above it through its
    # console: writes to stdout from the writer thread would land inside the bar's row.
    if error or err_console.is_terminal:
        err_console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        typer.echo(text)


def _report(outcome: Outcome) -> None:
    for note in outcome.notes:
        _say(note, error=True)
    if outcome.status == "written":
        _say(f"wrote {outcome.case.output} ({outcome.seconds:.1f} s)")
    else:
        source = str(outcome.case.source)
        _say(f"failed: {outcome.error if source in outcome.error else f'{source}: {outcome.error}'}", error=True)


def _plan(inputs, *, to, bundle_dir, settings, out_dir, overwrite, skip_existing, part, bids_root):
    """Check everything that can be checked before a case runs (exit 2 on any of it)."""
    session = Session(to, bundle_dir, settings)
    sources = expand_inputs(inputs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: expected an output folder that can be created, found "
                          f"{exc.strerror or exc}; choose another --out-dir") from None
    target = session.translator.target
    if bids_root is not None:
        from .bids import bids_naming
        naming = bids_naming(bids_root, out_dir, target.suffix)
    else:
        naming = flat_naming(out_dir, target.name)
    cases = plan_cases(sources, naming, part)
    todo, skipped = pending(cases, overwrite=overwrite, skip_existing=skip_existing)
    failures = out_dir / failures_name(part)
    from .cli import check_writable   # here: cli imports this module
    check_writable(failures, overwrite=True, suffixes=(".tsv",), what="failure list")
    return session, sources, todo, skipped, failures


def run_batch(inputs: Sequence[Path | str], *, to: str, settings: Settings, out_dir: Path | None,
              bundle_dir: Path | None = None, kind: str = "auto", overwrite: bool = False,
              skip_existing: bool = False, part: str | None = None, ray: str | None = None,
              workers: int | None = None, out: Path | None = None, preview: Path | None = None,
              bids_root: Path | None = None) -> int:
    """Run a batch and return its exit code. ``bids_root`` (galip-bids) replaces the flat
    ``OUT_DIR/<stem>_<domain>.nii.gz`` names with BIDS derivative ones."""
    started = time.perf_counter()
    with user_errors():
        if out_dir is None:
            raise ConfigError("several inputs (or a folder, glob or @list) need --out-dir DIR for the outputs; "
                              "add --out-dir")
        if out is not None or preview is not None:
            raise ConfigError(f"{'--out' if out is not None else '--preview'} works with one input; "
                              "with several use --out-dir DIR")
        if workers is not None and ray is None:
            raise ConfigError("--workers sizes the Ray actor pool; add --ray ADDRESS (e.g. --ray local)")
        part_kn = parse_part(part)
        session, sources, todo, skipped, failures = _plan(
            inputs, to=to, bundle_dir=bundle_dir, settings=settings, out_dir=out_dir, overwrite=overwrite,
            skip_existing=skip_existing, part=part_kn, bids_root=bids_root)
    share = f", part {part_kn[0]}/{part_kn[1]} of {len(sources)} inputs" if part_kn else ""
    where = f" on Ray ({ray})" if ray is not None else ""
    typer.echo(f"{len(todo)} volume(s) to translate to {session.translator.target.name} by {settings.model}{where}"
               f" ({len(skipped)} already done{share}); {session.translator.choice.reason}")
    done: list[Outcome] = []
    replace = overwrite or skip_existing   # what --skip-existing left to run is new or interrupted
    try:
        with _progress() as bar:
            cases = bar.add_task("volumes", total=len(todo))
            inside = bar.add_task("", total=None, visible=False)
            steps = bar.add_task("    sampling steps", total=None, visible=False)

            def on_done(outcome: Outcome) -> None:
                done.append(outcome)
                _report(outcome)
                bar.advance(cases)

            def on_start(case: Case) -> None:
                bar.reset(inside, description=f"  {case.source.name}", total=None, visible=True)
                bar.reset(steps, total=None, visible=False)

            def on_slices(n: int, total: int) -> None:
                bar.update(inside, completed=n, total=total)

            def on_step(n: int, total: int) -> None:
                bar.update(steps, completed=n, total=total, visible=True)

            if ray is not None:
                from .ray_batch import run_ray
                try:
                    run_ray(session, todo, address=ray, workers=workers, kind=kind, overwrite=replace,
                            on_done=on_done)
                except GalipError as error:
                    if not done:                  # nothing ran: one line, exit 2
                        with user_errors():
                            raise
                    listed = write_failures(failures, done)
                    _say(f"{error}; Ray stopped after {len(done)} of {len(todo)} cases"
                         f"{', failures listed in ' + str(listed) if listed else ''}; rerun with --skip-existing",
                         error=True)
                    return EXIT_CASES_FAILED
            else:
                with session:
                    run_cases(session, todo, kind=kind, overwrite=replace,
                              on_start=on_start, on_done=on_done, on_slices=on_slices, on_step=on_step)
    except (KeyboardInterrupt, Interrupted) as stop:     # Ctrl-C, SIGTERM, SIGHUP (runtime/signals.py)
        write_failures(failures, done)
        _say(f"interrupted: {sum(o.status == 'written' for o in done)} of {len(todo)} written; "
             "run the same command with --skip-existing to resume", error=True)
        return 128 + stop.signum if isinstance(stop, Interrupted) else EXIT_INTERRUPTED
    written = sum(o.status == "written" for o in done)
    n_failed = len(done) - written
    listed = write_failures(failures, done)
    wall = time.perf_counter() - started
    tail = f"; {n_failed} failed, listed in {listed}" if listed else ""
    typer.echo(f"translated {written} of {len(todo)} volume(s) into {out_dir} in {wall:.1f} s{tail}")
    return exit_code(done)
