"""Documentation that the code points to exists, and messages recommend only real commands."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for layer in ("runtime", "train", "export", "bench", "tests", "docs") for p in (ROOT / layer).rglob("*")
           if p.suffix in (".py", ".md", ".cuh", ".cpp")] + [ROOT / "README.md", ROOT / "Makefile"]
DESIGN = ROOT / "docs" / "design.md"
# a reference with a quoted section or phrase: docs/design.md, "The LMI operator"
QUOTED = re.compile(r'docs/design\.md[\s,(:]{0,4}"([^"]+)"')
FLAG = re.compile(r"\b(galip-[a-z]+)((?: [a-z][a-z-]*)?) (--[a-z][a-z0-9-]*)")


def _words(text: str) -> str:
    return " ".join(re.sub(r"^\s*(//|#)", " ", text, flags=re.M).split())


def test_every_design_reference_resolves():
    design = _words(DESIGN.read_text())
    stale, missing, checked = [], [], 0
    for path in SOURCES:
        text = path.read_text(errors="replace")
        if "DESIGN.md" in text and path.name != "test_docs.py":
            stale.append(path.relative_to(ROOT).as_posix())
        for quote in QUOTED.findall(_words(text)):
            checked += 1
            if quote not in design:
                missing.append(f"{path.relative_to(ROOT)}: {quote!r}")
    assert checked >= 10, f"only {checked} quoted references found: the pattern no longer matches"
    assert not stale, f"references to a DESIGN.md that is not in the repository: {stale}"
    assert not missing, "quoted parts of docs/design.md that it does not hold:\n" + "\n".join(missing)


def _options(app: typer.Typer) -> set[str]:
    """Every --option of a typer app, over all its subcommands."""
    found, stack = set(), [typer.main.get_command(app)]
    while stack:
        command = stack.pop()
        found |= {opt for p in command.params for opt in p.opts if opt.startswith("--")}
        stack += list(getattr(command, "commands", {}).values())      # subcommands of a group
    return found | {"--help"}


def test_messages_recommend_only_options_that_exist():
    from galip.bench.cli import app as bench
    from galip.bench.eval_cli import app as evaluate
    from galip.export.cli import app as export
    from galip.runtime.bids import app as bids
    from galip.runtime.cli import app as run
    from galip.train.cli import app as train
    from galip.train.data_cli import app as data
    options = {"galip-run": _options(run), "galip-export": _options(export), "galip-train": _options(train),
               "galip-data": _options(data), "galip-bench": _options(bench), "galip-eval": _options(evaluate),
               "galip-bids": _options(bids)}
    unknown = sorted({f"{path.relative_to(ROOT)}: {tool}{sub} {flag}" for path in SOURCES if path.name != "test_docs.py"
                      for tool, sub, flag in FLAG.findall(path.read_text(errors="replace"))
                      if tool in options and flag not in options[tool]})
    assert not unknown, "messages or docs recommend options that do not exist:\n" + "\n".join(unknown)


@pytest.mark.parametrize("text", ["galip-run --verify", "check it (galip-export x --no-such-flag)"])
def test_the_option_check_can_fail(text):
    from galip.runtime.cli import app
    tool, _, flag = FLAG.search(text).groups()
    assert tool.startswith("galip-") and flag not in _options(app)
