"""The bundle contract exists once: LMI defaults, the op identity and graph I/O names live in
galip.runtime.contract, docs/contracts.md agrees with it, and its entries round-trip."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from galip.runtime import contract
from galip.runtime.contract import (DiffusionEntry, EngineEntry, GeneratorEntry, GraphFile, LmiParams,
                                    SamplerDefaults)
from galip.runtime.errors import BundleError, ConfigError
from galip.runtime.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "train", "export", "bench")
CONTRACT = ROOT / "runtime" / "contract"
LMI_NAMES = set(contract.LMI_PARAM_NAMES)
DEFAULTS = contract.DEFAULT_LMI.kwargs()
OP_IDENTITY = {contract.LMI_OP_TYPE, contract.LMI_PLUGIN_ID}
# I/O names distinctive enough to be a copy wherever they appear as a string constant
DISTINCT_IO = {contract.GEN_OUTPUT, contract.STEP_X_T, contract.STEP_LMI_SOURCE, contract.STEP_X_PREV,
               contract.STEP_X0, contract.STEP_X0_LAST, contract.LMI_Y_AT, *contract.STEP_SCALAR_INPUTS[1:5],
               contract.LMI_NODE_OUTPUTS[2]}
# generic words ("image", "x"): a copy only as a key of a feed dict or an outputs[...] index
FEED_IO = {*contract.GENERATOR_INPUTS, *contract.LMI_GRAPH_INPUTS, *contract.LMI_GRAPH_OUTPUTS,
           *contract.STEP_INPUTS, *contract.STEP_OUTPUTS} - {contract.LMI_OUT}
# The step table's columns are the step graph's scalar inputs: defined once, in schedule.py's
# STEP_SCALARS (the contract re-exports them), which may spell them. The eager sampler still
# reads the table's rows by column name (to move onto STEP_SCALARS when it is next touched).
PENDING = {"runtime/schedule.py": set(contract.STEP_SCALAR_INPUTS)}   # where STEP_SCALARS is defined


def sources():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if CONTRACT not in path.parents:
                yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _const(node, kinds=(int, float, bool, str)):
    return isinstance(node, ast.Constant) and type(node.value) in kinds


def _is_default(name: str, value: ast.AST) -> bool:
    """``value`` is the contract's default for LMI parameter ``name`` (or 8/255 for sigma)."""
    if name not in LMI_NAMES:
        return False
    if name == "sigma" and isinstance(value, ast.BinOp):
        return ast.unparse(value).replace(" ", "") == "8/255"
    return _const(value, (int, float, bool)) and type(value.value) is type(DEFAULTS[name]) \
        and value.value == DEFAULTS[name]


def _feeds(tree: ast.AST):
    """Dicts passed to a runner (``.infer({...})``, ``.run_loop({...}, ...)``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("infer", "run_loop"):
            yield from (arg for arg in node.args if isinstance(arg, ast.Dict))


def stray_copies(rel: str, tree: ast.AST) -> list[str]:
    found = set()
    pending = PENDING.get(rel, set())

    def hit(node, what):
        found.add(f"{rel}:{node.lineno}: {what}")

    for feed in _feeds(tree):
        for key in feed.keys:
            if key is not None and _const(key, (str,)) and key.value in FEED_IO - pending:
                hit(key, f"graph I/O name {key.value!r} in a feed")
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and ast.unparse(node).replace(" ", "") == "8/255":
            hit(node, "LMI sigma 8/255")
        elif isinstance(node, ast.arguments):
            named = [*node.posonlyargs, *node.args]
            pairs = list(zip(named[len(named) - len(node.defaults):], node.defaults))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            for arg, default in pairs:
                if _is_default(arg.arg, default):
                    hit(default, f"LMI default {arg.arg}")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None \
                and _is_default(node.target.id, node.value):
            hit(node, f"LMI default {node.target.id}")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if key is not None and _const(key, (str,)) and _is_default(key.value, value):
                    hit(key, f"LMI default {key.value}")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) \
                and isinstance(node.value.func, ast.Attribute) and node.value.func.attr in ("infer", "run_loop") \
                and _const(node.slice, (str,)) and node.slice.value in FEED_IO - pending:
            hit(node, f"graph I/O name {node.slice.value!r} read from a runner")
        elif _const(node, (str,)):
            if node.value in OP_IDENTITY:
                hit(node, f"LMI op identity {node.value!r}")
            elif node.value in DISTINCT_IO - pending:
                hit(node, f"graph I/O name {node.value!r}")
    return sorted(found)


def test_no_stray_copies_of_the_contract():
    found = [line for rel, tree in sources() for line in stray_copies(rel, tree)]
    assert not found, "copies of contract facts outside galip.runtime.contract:\n" + "\n".join(found)


def test_the_grep_can_fail():
    tree = ast.parse('def f(patch=3, sigma=8 / 255): return {"bins": 27}, r.infer({"image": x})["y"], "LMI"\n'
                     'class C:\n    radius: int = 1\n    name = "x_prev"\n')
    found = stray_copies("m.py", tree)
    assert len(found) == 9, found      # sigma counts twice: a default and a literal 8/255


# ----------------------------------------------------------------------------- LMI parameters
def test_lmi_params_validate_once():
    assert LmiParams().kwargs() == {"patch": 3, "radius": 1, "bins": 27, "sigma": 8 / 255, "normalize": True}
    for bad, match in [({"patch": 4}, "odd"), ({"patch": 3.0}, "odd"), ({"radius": -1}, "radius"),
                       ({"bins": 1}, "bins"), ({"sigma": 0.0}, "sigma"), ({"sigma": float("nan")}, "sigma"),
                       ({"bins": True}, "bins")]:
        with pytest.raises(ConfigError, match=match):
            LmiParams(**bad)
    assert LmiParams.from_manifest(LmiParams(bins=12).to_manifest()) == LmiParams(bins=12).exported()
    with pytest.raises(BundleError, match="re-export"):
        LmiParams.from_manifest({"patch": 2})


def test_training_config_is_the_contract():
    from galip.train.midiffusion.conditioning import LMIConfig
    assert isinstance(LMIConfig(), LmiParams) and LMIConfig().kwargs() == LmiParams().kwargs()
    with pytest.raises(ConfigError, match="odd"):
        LMIConfig(patch=2)


# ----------------------------------------------------------------------------- entries
def test_entries_round_trip():
    engine = {"file": "g.engine", "precision": "fp16", "tensorrt_version": "10.13.0", "compute_capability": "9.0",
              "version_compatible": False,
              "profiles": {"image": {"min": [1, 1, 32, 32]}}, "strongly_typed": True}
    generator = {"graphs": {"fp32": {"file": "g.onnx"}}, "engines": [engine], "domains": ["T2"],
                 "source_kinds": ["mri"], "io": {"anything": 1}}
    entry = GeneratorEntry.from_manifest(generator)
    assert entry.engines[0] == EngineEntry("g.engine", "fp16", "10.13.0", "9.0")
    assert entry.to_manifest() == generator
    diffusion = {"graphs": {"fp32": {"file": "s.onnx", "external_data": ["s.bin"]}},
                 "lmi_graph": {"file": "lmi.onnx", "engines": []}, "engines": [],
                 "schedule": NoiseSchedule(timesteps=100).to_manifest(), "lmi": LmiParams(bins=8).to_manifest(),
                 "sampler": SamplerDefaults(steps=10).to_manifest(), "conditioning": {"clip_x0": True},
                 "data_range": [-1.0, 1.0], "net": {"ch": 8}}
    entry = DiffusionEntry.from_manifest(diffusion)
    assert entry.graphs["fp32"] == GraphFile("s.onnx", ("s.bin",)) and entry.lmi.bins == 8
    assert entry.sampler.steps == 10 and entry.data_range == (-1.0, 1.0)
    assert entry.to_manifest() == diffusion


# ----------------------------------------------------------------------------- docs/contracts.md
def _doc_tables() -> dict[str, dict[str, str]]:
    """``{table title: {first cell: second cell}}`` of every table in docs/contracts.md."""
    tables, title = {}, None
    for line in (ROOT / "docs" / "contracts.md").read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        elif line.startswith("|") and not set(line) <= set("|- "):
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            if cells[0] not in ("name", "parameter", "field"):
                tables.setdefault(title, {})[cells[0]] = cells[1]
    return tables


def test_contracts_doc_matches_the_module():
    tables = _doc_tables()
    assert tables["Generator graph"] == {**contract.GENERATOR_INPUTS, **contract.GENERATOR_OUTPUTS}
    assert tables["LMI graph"] == {**contract.LMI_GRAPH_INPUTS, **contract.LMI_GRAPH_OUTPUTS}
    assert tables["Diffusion step graph"] == {**contract.STEP_INPUTS, **contract.STEP_OUTPUTS}
    assert tables["LMI parameters"] == {k: repr(v) if k != "sigma" else "8/255"
                                       for k, v in contract.DEFAULT_LMI.kwargs().items()}
    assert tables["LMI node"] == {"domain": contract.LMI_DOMAIN, "op_type": contract.LMI_OP_TYPE,
                                  "plugin_namespace": contract.LMI_PLUGIN_NAMESPACE,
                                  "outputs": ", ".join(contract.LMI_NODE_OUTPUTS)}
    assert tables["Sampler defaults"] == {k: str(v) for k, v in SamplerDefaults().to_manifest().items()}
