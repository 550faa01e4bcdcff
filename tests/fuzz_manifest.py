"""Seeded, structure-aware manifest fuzzer for ``load_bundle`` and ``prepare`` (issue 16).

Each case takes the tiny test bundle's valid manifest (generator and a T2 diffusion model),
applies 1-3 mutations (a field deleted, retyped, set to an edge value or a path trick,
keys renamed or added, deep nesting, or raw text edits: byte flips, truncation, NaN,
huge numbers), writes it into the bundle and runs ``load_bundle`` (checksums on) and,
if that accepts it, ``prepare`` for the generator and for diffusion. Only ``GalipError``
may escape; a case past ``--limit`` seconds is a hang. As a script it prints a JSON
summary with the peak RSS::

    python tests/fuzz_manifest.py --cases 2000 --seed 0
"""
from __future__ import annotations

import copy
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures_bundle import build_tiny_bundle  # noqa: E402
from fuzz_driver import drive, main  # noqa: E402
from galip.runtime.bundle import MANIFEST_NAME, load_bundle  # noqa: E402
from galip.runtime.errors import GalipError  # noqa: E402
from galip.runtime.pipeline import Settings, prepare  # noqa: E402

POOL: list[Any] = [None, True, False, 0, 1, -1, 2, 3, 5, 31, 1000, 2 ** 31, 2 ** 63, 10 ** 30, 0.5, -2.5, 1e-300,
                   1e308, -1e308, "", "x", "T2", "T2w", "fp16", "ddim", "2mm", "../manifest.json", "/etc/passwd",
                   "generator.onnx/", "./generator.onnx", "GENERATOR.ONNX", "a\\b", "lmi.onnx", "C:/x", "0" * 64,
                   "x" * 5000, [], {}, [1, 2], [0.5, 99.5], [-1, 1], [99, 1], {"file": "generator.onnx"},
                   {"file": "nope.onnx"}, {"fp32": {"file": "generator.onnx"}}, ["T1", "T1"], ["T9"]]


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON tree (dict keys and list indices)."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, prefix + (index,))
    return found


def _parent(tree: Any, path: tuple) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


def mutate_tree(tree: dict, rng: random.Random) -> Any:
    """One structural mutation of the parsed manifest (returns the new tree)."""
    path = rng.choice(paths(tree)[1:])
    parent, key = _parent(tree, path), path[-1]
    kind = rng.choice(["value", "value", "value", "delete", "wrap", "rename", "extra", "deep", "swap"])
    if kind == "value":
        parent[key] = copy.deepcopy(rng.choice(POOL))
    elif kind == "delete":
        del parent[key]
    elif kind == "wrap":
        parent[key] = rng.choice([[parent[key]], {"v": parent[key]}, str(parent[key])])
    elif kind == "rename" and isinstance(parent, dict):
        parent[rng.choice(["", "T2 ", "t2", "file", "graphs", "fp64", "../x"])] = parent.pop(key)
    elif kind == "extra" and isinstance(parent, dict):
        parent[rng.choice(["extra", "file", "engines", "preprocess", "T3"])] = copy.deepcopy(rng.choice(POOL))
    elif kind == "deep":
        nested: Any = 1
        for _ in range(rng.choice([10, 31, 40, 300])):
            nested = [nested]
        parent[key] = nested
    elif kind == "swap":
        other = rng.choice(paths(tree)[1:])
        other_parent = _parent(tree, other)
        try:
            parent[key], other_parent[other[-1]] = other_parent[other[-1]], parent[key]
        except (KeyError, IndexError, TypeError):
            pass
    return tree


def mutate_text(text: str, rng: random.Random) -> str:
    """Raw edits of the JSON text: byte flips, truncation, non-JSON constants, huge numbers."""
    kind = rng.choice(["flip", "cut", "nan", "digits", "brackets"])
    if kind == "flip":
        chars = list(text)
        for _ in range(rng.randint(1, 6)):
            chars[rng.randrange(len(chars))] = chr(rng.randrange(32, 127))
        return "".join(chars)
    if kind == "cut":
        return text[: rng.randrange(len(text))]
    if kind == "nan":
        return text.replace("2.0", rng.choice(["NaN", "Infinity", "-Infinity"]), 1)
    if kind == "digits":
        return text.replace("32", "9" * rng.choice([400, 4000, 5000]), 1)
    return text.replace("[", "[" * rng.choice([33, 5000]), 1)


def make_case(index: int, seed: int, base: dict) -> str:
    rng = random.Random(f"manifest:{seed}:{index}")
    tree = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        if not isinstance(tree, dict) or len(paths(tree)) < 2:
            break
        tree = mutate_tree(tree, rng)
    text = json.dumps(tree, indent=1)
    return mutate_text(text, rng) if rng.random() < 0.2 else text


def run_case(root: Path) -> str:
    try:
        bundle = load_bundle(root)
        prepare(bundle, "T2", Settings(model="generator", backend="onnxruntime-cpu"))
        prepare(bundle, "T2", Settings(model="diffusion", backend="onnxruntime-cpu"))
    except GalipError as error:
        assert "\n" not in str(error), str(error)
        return type(error).__name__
    return "accepted"


def fuzz(cases: int, seed: int, limit: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = build_tiny_bundle(Path(folder) / "bundle", timesteps=50)
        base = json.loads((root / MANIFEST_NAME).read_text())

        def each():
            for index in range(cases):
                (root / MANIFEST_NAME).write_text(make_case(index, seed, base))
                yield str(index), lambda: run_case(root)

        return drive(each(), limit)


if __name__ == "__main__":
    main(fuzz, __doc__.splitlines()[0])
