"""A tiny bundle for runtime tests, built with onnx.helper (no torch), to the bundle contract.

* ``generator.onnx`` — image float32 [N,1,H,W] in [0, 1], domain int64 [N] →
  translated [N,1,H,W]. Per-domain tables (Gather on ``domain``) of a gain ``a``, an
  offset ``b``, a residual weight ``c`` and a conv-feature embedding::

      translated = a[d]·x + b[d] + c[d]·Conv1x1(ReLU(Conv3x3(x) + emb[d]))

  T1 is the identity (a=1, b=0, c=0), so a T1→T1 run gives the input back exactly up to
  the intensity clipping (geometry checks); T2 inverts the contrast; PD and CT differ again.
* ``lmi.onnx`` — the real ``galip::LMI`` function (galip.export.lmi_onnx), small bins.
* ``diffusion_T2_step.onnx`` — one step honouring the step contract, with
  an ε "network" that knows the answer: target x₀* = 1 − 2·source (model space [−1, 1],
  i.e. the inverted source in [0, 1]) plus a bounded term that reads the LMI condition and
  the timestep::

      ε  = (x_t − √ᾱ_t·x₀*)/√(1−ᾱ_t) − K·√ᾱ_t/√(1−ᾱ_t)·tanh(Conv3x3([LMI(source, u(x_t)), lmi_source]) + t/T + x_t)
      x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t = x₀* + K·tanh(…),   u(x_t) = clip((x_t+1)/2, 0, 1)
      x_prev = c_x·x_t + c_0·x̂₀ + c_1·x0_last + σ·noise   (galip.runtime.schedule.combine)

  so a correct sampler lands within K/2 (in [0, 1]) of the inverted source, and the
  result still depends on the noise (through x_t and LMI(source, u(x_t))).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from galip.export import lmi_onnx
from galip.runtime.bundle import write_manifest
from galip.runtime.domains import DOMAINS
from galip.runtime.schedule import STEP_SCALARS

OPSET = 17
DIMS = ["N", 1, "H", "W"]
GENERATOR_DOMAINS = ("T1", "T2", "PD", "CT")
TABLES = {   # by class id order T1, T2, PD, CT
    "a": [1.0, -1.0, 0.5, 0.8],
    "b": [0.0, 1.0, 0.25, 0.1],
    "c": [0.0, 0.1, 0.1, 0.1],
}
CHANNELS = 4
LMI = {"patch": 3, "radius": 1, "bins": 8, "sigma": 0.11, "normalize": True}
K = 0.04                     # bound of the diffusion model's deviation from x₀* (model space)
SCHEDULE = {"kind": "ddpm_linear", "beta_start": 1e-4, "beta_end": 0.02, "timesteps": 1000}


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, name, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=lmi_onnx.MIN_IR_VERSION, producer_name="galip-tests")
    return model


def generator_model(seed: int = 0) -> onnx.ModelProto:
    """The tiny domain-conditioned generator (contract: image, domain → translated)."""
    rng = np.random.default_rng(seed)
    n_domains = len(TABLES["a"])
    init = [
        _const("table_a", np.asarray(TABLES["a"], np.float32)),
        _const("table_b", np.asarray(TABLES["b"], np.float32)),
        _const("table_c", np.asarray(TABLES["c"], np.float32)),
        _const("table_emb", rng.normal(0, 0.5, (n_domains, CHANNELS)).astype(np.float32)),
        _const("w1", rng.normal(0, 0.5, (CHANNELS, 1, 3, 3)).astype(np.float32)),
        _const("b1", np.zeros(CHANNELS, np.float32)),
        _const("w2", rng.normal(0, 0.5, (1, CHANNELS, 1, 1)).astype(np.float32)),
        _const("axes_123", np.array([1, 2, 3], np.int64)),
        _const("axes_23", np.array([2, 3], np.int64)),
    ]
    N = helper.make_node
    nodes = [
        N("Gather", ["table_a", "domain"], ["a_n"], axis=0),
        N("Unsqueeze", ["a_n", "axes_123"], ["a"]),
        N("Gather", ["table_b", "domain"], ["b_n"], axis=0),
        N("Unsqueeze", ["b_n", "axes_123"], ["b"]),
        N("Gather", ["table_c", "domain"], ["c_n"], axis=0),
        N("Unsqueeze", ["c_n", "axes_123"], ["c"]),
        N("Gather", ["table_emb", "domain"], ["emb_n"], axis=0),
        N("Unsqueeze", ["emb_n", "axes_23"], ["emb"]),                       # (N, C, 1, 1)
        N("Conv", ["image", "w1", "b1"], ["h0"], pads=[1, 1, 1, 1]),
        N("Add", ["h0", "emb"], ["h1"]),
        N("Relu", ["h1"], ["h2"]),
        N("Conv", ["h2", "w2"], ["r0"]),
        N("Mul", ["r0", "c"], ["r"]),
        N("Mul", ["image", "a"], ["ax"]),
        N("Add", ["ax", "b"], ["axb"]),
        N("Add", ["axb", "r"], ["translated"]),
    ]
    return _model(nodes, "tiny_generator",
                  [helper.make_tensor_value_info("image", TensorProto.FLOAT, DIMS),
                   helper.make_tensor_value_info("domain", TensorProto.INT64, ["N"])],
                  [helper.make_tensor_value_info("translated", TensorProto.FLOAT, DIMS)], init)


def generator_reference(image: np.ndarray, class_id: int) -> np.ndarray:
    """The generator's output where it is affine (c = 0): a·x + b. Only T1 (identity) qualifies."""
    assert TABLES["c"][class_id] == 0.0
    return TABLES["a"][class_id] * image + TABLES["b"][class_id]


def diffusion_step_model(timesteps: int = SCHEDULE["timesteps"], seed: int = 1) -> onnx.ModelProto:
    """One step of the step contract with the 'knows the answer' ε (module docstring)."""
    rng = np.random.default_rng(seed)
    init = [
        _const("one", np.float32(1.0)), _const("two", np.float32(2.0)), _const("half", np.float32(0.5)),
        _const("zero", np.float32(0.0)), _const("k", np.float32(K)),
        _const("inv_T", np.float32(1.0 / timesteps)),
        _const("w_cond", rng.normal(0, 0.5, (1, 2, 3, 3)).astype(np.float32)),
    ]
    N = helper.make_node
    nodes = [
        # u(x_t) = clip((x_t + 1)/2, 0, 1): the x_t → LMI-input map of training
        N("Add", ["x_t", "one"], ["xt1"]), N("Mul", ["xt1", "half"], ["xt2"]),
        N("Clip", ["xt2", "zero", "one"], ["u"]),
        lmi_onnx.lmi_node("source", "u", ("lmi_xt", "y_at_xt"), name="lmi_xt", **LMI),
        N("Concat", ["lmi_xt", "lmi_source"], ["cond"], axis=1),
        N("Conv", ["cond", "w_cond"], ["cond1"], pads=[1, 1, 1, 1]),
        N("Mul", ["timestep", "inv_T"], ["t_frac"]),
        N("Add", ["cond1", "t_frac"], ["cond2"]),
        N("Add", ["cond2", "x_t"], ["cond3"]),
        N("Tanh", ["cond3"], ["dev"]),                                        # in (−1, 1)
        # x₀* = 1 − 2·source
        N("Mul", ["source", "two"], ["s2"]), N("Sub", ["one", "s2"], ["x0_star"]),
        N("Sqrt", ["alpha_bar_t"], ["sa"]),
        N("Sub", ["one", "alpha_bar_t"], ["oma"]), N("Sqrt", ["oma"], ["s1a"]),
        # ε = (x_t − sa·x₀*)/s1a − K·sa/s1a·dev
        N("Mul", ["sa", "x0_star"], ["sa_x0"]), N("Sub", ["x_t", "sa_x0"], ["num"]),
        N("Mul", ["dev", "k"], ["kdev"]), N("Mul", ["kdev", "sa"], ["kdev_sa"]),
        N("Sub", ["num", "kdev_sa"], ["num2"]), N("Div", ["num2", "s1a"], ["eps"]),
        # x̂₀ = (x_t − s1a·ε)/sa
        N("Mul", ["s1a", "eps"], ["s1a_eps"]), N("Sub", ["x_t", "s1a_eps"], ["x0n"]),
        N("Div", ["x0n", "sa"], ["x0_pred"]),
        # x_prev = c_x·x_t + c_0·x̂₀ + c_1·x0_last + σ·noise
        N("Mul", ["coef_xt", "x_t"], ["t1"]), N("Mul", ["coef_x0", "x0_pred"], ["t2"]),
        N("Mul", ["coef_x0_last", "x0_last"], ["t3"]), N("Mul", ["sigma", "noise"], ["t4"]),
        N("Add", ["t1", "t2"], ["t12"]), N("Add", ["t3", "t4"], ["t34"]), N("Add", ["t12", "t34"], ["x_prev"]),
    ]
    image = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, DIMS)  # noqa: E731
    scalar = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])  # noqa: E731
    model = _model(nodes, "tiny_diffusion_step",
                   [image("x_t"), image("source"), image("lmi_source"),
                    *(scalar(name) for name in STEP_SCALARS), image("noise"), image("x0_last")],
                   [image("x_prev"), image("x0_pred")], init)
    return lmi_onnx.add_lmi_function(model, LMI)


def _domains(names) -> dict:
    return {n: {k: v for k, v in DOMAINS[n].to_dict().items() if k != "name"} for n in names}


def build_tiny_bundle(root: str | Path, *, spacing: float | None = None, axis: int = 2,
                      diffusion_targets: tuple[str, ...] = ("T2",), timesteps: int = SCHEDULE["timesteps"],
                      name: str | None = "tiny", source_kinds: tuple[str, ...] | None = None,
                      bias_field: str | None = None) -> Path:
    """Write the tiny bundle into ``root`` (created) and return it.

    ``spacing`` None keeps the input's in-plane spacing (no resampling, so identity runs
    are exact); slices are padded to multiples of 32. ``timesteps``: T of the diffusion
    schedule (small T makes ``--sampler ddpm`` quick). ``source_kinds``: what the
    generator's manifest entry says it was trained on (None: derived from its domains).
    ``bias_field``: the generator's own preprocess says so ("none"/"n4"; None: no entry).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(generator_model(), root / "generator.onnx")
    models: dict = {"generator": {
        "domains": list(GENERATOR_DOMAINS),
        "graphs": {"fp32": {"file": "generator.onnx"}},
        "engines": [],
        "io": {"inputs": {"image": "float32[N,1,H,W]", "domain": "int64[N]"},
               "outputs": {"translated": "float32[N,1,H,W]"}},
    }}
    if source_kinds is not None:
        models["generator"]["source_kinds"] = list(source_kinds)
    preprocess = {"axis": axis, "spacing": spacing, "size_multiple": 32, "percentiles": [0.5, 99.5]}
    if bias_field is not None:
        models["generator"]["preprocess"] = {**preprocess, "bias_field": bias_field}
    if diffusion_targets:
        onnx.save(lmi_onnx.lmi_model(**LMI), root / "lmi.onnx")
        models["diffusion"] = {}
        for target in diffusion_targets:
            step = f"diffusion_{target}_step.onnx"
            onnx.save(diffusion_step_model(timesteps), root / step)
            models["diffusion"][target] = {
                "graphs": {"fp32": {"file": step}}, "lmi_graph": {"file": "lmi.onnx"}, "engines": [],
                "schedule": {**SCHEDULE, "timesteps": timesteps}, "lmi": dict(LMI),
                "sampler": {"default": "ddim", "steps": 4}, "data_range": [-1.0, 1.0],
            }
    manifest = {
        "preprocess": preprocess,
        "domains": _domains(GENERATOR_DOMAINS),
        "models": models,
    }
    if name:
        manifest["name"] = name
    write_manifest(root, manifest)
    return root


# ----------------------------------------------------------------------------- test volumes
def oblique_affine() -> np.ndarray:
    """About 20° about x and 25° about z, anisotropic 1.3 × 0.9 × 1.6 mm voxels."""
    def rot(axis: int, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m
    affine = np.eye(4)
    affine[:3, :3] = rot(2, 25) @ rot(0, 20) @ np.diag([1.3, 0.9, 1.6])
    affine[:3, 3] = [-20.0, 30.0, 10.0]
    return affine


def lps_affine(zooms=(1.3, 0.9, 1.6)) -> np.ndarray:
    affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    affine[:3, 3] = [25.0, 20.0, -15.0]
    return affine


def phantom_volume(shape=(18, 22, 9), seed: int = 0) -> np.ndarray:
    """Smooth asymmetric blob (a flip or transpose shows) on a zero background corner, float32."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = 600 * np.exp(-((grid[0] - 0.2) ** 2 + grid[1] ** 2 * 1.5 + (grid[2] + 0.1) ** 2) * 2.0)
    data = 100 + blob + 80 * grid[0] + 40 * grid[1] ** 2 + 30 * grid[2] + rng.uniform(0, 5, shape)
    data[: shape[0] // 4, : shape[1] // 4, :] = 0.0
    return data.astype(np.float32)


def write_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, codes=(1, 1)) -> Path:
    """Write ``data`` as NIfTI-1 with ``affine`` in qform/sform under the given codes, mm units."""
    import nibabel as nib
    image = nib.Nifti1Image(np.asarray(data), affine)
    image.header.set_qform(affine, code=codes[0])
    image.header.set_sform(affine, code=codes[1])
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return Path(path)
