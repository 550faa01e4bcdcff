"""MIDiffusion: score network, schedule, conditioning, samplers, training, CLI.

Tiny networks on 16² inputs and a cheap stand-in for the LMI operator keep these at
seconds on a shared 2-core machine; the real operator is exercised in
test_diffusion_lmi.py.
"""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from galip.runtime.schedule import NoiseSchedule, SliceNoise, combine, step_table
from galip.train.checkpoint import save_checkpoint
from galip.train.midiffusion import conditioning, samplers
from galip.train.midiffusion import trainer as trainer_module
from galip.train.midiffusion.cli import diffusion
from galip.train.midiffusion.conditioning import LMIConfig, LMIDenoiser
from galip.train.midiffusion.schedule import DDPMSchedule, ddim_timesteps, q_sample
from galip.train.midiffusion.scorenet import ScoreNet, ScoreNetConfig, count_parameters
from galip.train.midiffusion.trainer import load_denoiser, train_diffusion

TINY = ScoreNetConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), groups=4)
SHORT = DDPMSchedule(num_timesteps=12, beta_start=1e-3, beta_end=0.3)


def fake_lmi(x, y, config):
    """Cheap stand-in with the operator's shape and dependence on both inputs."""
    return F.avg_pool2d(1.0 - (x - y).abs(), 3, 1, 1, count_include_pad=False)



@pytest.fixture(autouse=True)
def stub_lmi(monkeypatch):
    monkeypatch.setattr(conditioning, "lmi_map", fake_lmi)


@pytest.fixture
def slices():
    rng = np.random.default_rng(0)
    base = rng.random((6, 4, 4)).astype(np.float32)
    return np.kron(base, np.ones((4, 4), np.float32))      # (6, 16, 16) blocky "anatomy"


def tiny_denoiser(seed=0):
    torch.manual_seed(seed)
    return LMIDenoiser(ScoreNet(TINY)).eval()


# ---------------------------------------------------------------- score network
def test_reference_network_has_8950913_parameters():
    assert count_parameters(ScoreNet(ScoreNetConfig())) == 8_950_913


@pytest.mark.parametrize("hw", [(8, 8), (16, 24)])
def test_reference_network_any_multiple_of_8(hw):
    net = ScoreNet().eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *hw), torch.tensor([0, 999]))
    assert out.shape == (2, 1, *hw)


def test_network_refuses_sizes_off_the_multiple():
    with pytest.raises(ValueError, match="multiples of 8"):
        ScoreNet()(torch.randn(1, 3, 12, 16), torch.tensor([1]))


def test_config_round_trips_through_json():
    config = ScoreNetConfig()
    assert ScoreNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert DDPMSchedule.from_dict(json.loads(json.dumps(SHORT.to_dict()))) == SHORT
    assert LMIConfig.from_dict(json.loads(json.dumps(LMIConfig().to_dict()))) == LMIConfig()


# ---------------------------------------------------------------- schedule
def test_linear_schedule_endpoints():
    schedule = DDPMSchedule()
    assert schedule.betas[0] == pytest.approx(1e-4) and schedule.betas[-1] == pytest.approx(0.02)
    assert float(schedule.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=0.01)


@pytest.mark.parametrize("steps", [1, 3, 10, 1000])
def test_ddim_timesteps_start_at_pure_noise_and_descend(steps):
    ts = ddim_timesteps(1000, steps)
    assert len(ts) == steps and ts[0] == 999 and ts[-1] >= 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if steps == 1000:
        assert ts == list(range(999, -1, -1))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_timesteps_match_the_runtime_table(spacing):
    from galip.runtime.schedule import ddim_timesteps as runtime_timesteps
    for steps in (1, 2, 3, 7, 10, 50, 333, 999, 1000):
        assert ddim_timesteps(1000, steps, spacing) == runtime_timesteps(1000, steps, spacing).tolist()


# ---------------------------------------------------------------- the update and the samplers
@pytest.mark.parametrize("steps", [12, 7, 4, 1])
def test_ddim_eta_0_with_the_true_noise_stays_on_the_trajectory(steps):
    """With the true x̂₀ the DDIM row's coefficients move x_t = q(x₀, t, ε) to q(x₀, t_prev, ε)."""
    table = step_table(SHORT.noise_schedule, "ddim", steps)
    x0, eps = torch.rand(2, 1, 4, 4).double() * 2 - 1, torch.randn(2, 1, 4, 4).double()
    ab = torch.from_numpy(SHORT.noise_schedule.alpha_bars)       # float64, the table's own
    ts = [int(t) for t in table.timestep] + [-1]
    for row, t_prev in zip(table.rows(), ts[1:]):
        x_t = q_sample(x0, torch.tensor([int(row["timestep"])]), eps, ab)
        coefs = [row[k] for k in ("coef_xt", "coef_x0", "coef_x0_last", "sigma")]
        got = combine(x_t, x0, torch.zeros_like(x0), torch.randn_like(x0) * 100, *coefs)
        expected = x0 if t_prev < 0 else q_sample(x0, torch.tensor([t_prev]), eps, ab)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


class LinearEps(torch.nn.Module):
    """ε(x_t, t) = a·x_t + b: a known, linear ε-model (no LMI)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x_t, t, source, lmi_source_source):
        return self.a * x_t + self.b

    def reference_lmi(self, source):
        return torch.zeros_like(source)


def test_dpm_solver_2m_against_a_hand_computation():
    """Lu et al. 2022 (DPM-Solver++, Alg. 2) step by step in float64 with λ = log(α/σ), for
    a linear ε: x̂₀ = (x − σ ε)/α, D = (1 + 1/2r) x̂₀ − 1/2r x̂₀_last, x ← (σ'/σ) x − α'(e^{−h} − 1) D."""
    schedule = NoiseSchedule(1e-3, 0.3, 12)
    table = step_table(schedule, "dpmpp2m", 4)
    model, x_T = LinearEps(0.3, 0.05), 0.4
    got = samplers.sample(model, torch.zeros(1, 1, 1, 1), table, FixedNoise(x_T), clip=None)
    ab = schedule.alpha_bars
    ts = list(table.timestep)
    alpha = lambda t: 1.0 if t < 0 else np.sqrt(ab[t])          # noqa: E731
    sigma = lambda t: 0.0 if t < 0 else np.sqrt(1 - ab[t])      # noqa: E731
    lam = lambda t: np.log(alpha(t) / sigma(t))                 # noqa: E731
    x, x0_last, h_last = x_T, None, None
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        x0 = (x - sigma(t) * (0.3 * x + 0.05)) / alpha(t)
        if t_prev < 0:                      # to the clean end: first order, x = x̂₀
            x = x0
            break
        h = lam(t_prev) - lam(t)
        if x0_last is None:
            d = x0
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
        x = sigma(t_prev) / sigma(t) * x - alpha(t_prev) * (np.exp(-h) - 1) * d
        x0_last, h_last = x0, h
    assert float(got) == pytest.approx(np.clip((x + 1) / 2, 0, 1), abs=1e-6)
    assert 0.0 < float(got) < 1.0                                 # not a clipped bound


def test_dpm_solver_is_exact_for_a_point_mass():
    """For data = one point x₀*, ε* = (x − √ᾱ x₀*)/√(1−ᾱ) is linear and x̂₀ = x₀* at every t:
    the multistep solver must land on x₀* exactly in any number of steps."""
    schedule = NoiseSchedule()
    x0_star = torch.tensor(-0.37).double()
    for steps in (2, 3, 10):
        table = step_table(schedule, "dpmpp2m", steps)
        got = samplers.sample(PointMassEps(x0_star, schedule), torch.zeros(1, 1, 1, 1), table,
                              FixedNoise(1.3), clip=None)
        assert float(got) == pytest.approx(float((x0_star + 1) / 2), abs=1e-5)


class PointMassEps(torch.nn.Module):
    def __init__(self, x0_star, schedule):
        super().__init__()
        self.x0_star, self.ab = x0_star, torch.from_numpy(schedule.alpha_bars)

    def forward(self, x_t, t, source, lmi_source_source):
        ab = self.ab[t.long()].reshape(-1, 1, 1, 1).to(x_t.dtype)
        return (x_t - ab.sqrt() * self.x0_star) / (1 - ab).sqrt()

    def reference_lmi(self, source):
        return torch.zeros_like(source)


class FixedNoise:
    """x_T = value; no z is drawn by a deterministic sampler (a draw would fail the test)."""

    def __init__(self, value: float):
        self.value, self.draws = value, 0

    def draw(self):
        self.draws += 1
        assert self.draws == 1, "a deterministic sampler drew noise after x_T"
        return np.full((1, 1, 1, 1), self.value, np.float32)


def test_samplers_are_deterministic_by_seed():
    model, source = tiny_denoiser(), torch.rand(2, 1, 8, 8)

    def run(seed, sampler, eta):
        table = step_table(DDPMSchedule().noise_schedule, sampler, 3, eta)
        return samplers.sample(model, source, table, SliceNoise(seed, 2, (1, 8, 8)))
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("dpmpp2m", 0.0)):
        assert torch.equal(run(0, sampler, eta), run(0, sampler, eta))
        assert not torch.equal(run(0, sampler, eta), run(1, sampler, eta))
        assert run(0, sampler, eta).shape == source.shape


# ---------------------------------------------------------------- shared conditioning
def test_one_condition_function_serves_training_and_sampling(monkeypatch, tmp_path, slices):
    calls = {"condition": [], "lmi": []}
    real_condition = conditioning.condition

    def spy_condition(x_t, reference, lmi_ref_ref, config, lmi_fn=None):
        calls["condition"].append(reference.clone())
        return real_condition(x_t, reference, lmi_ref_ref, config, lmi_fn)

    def spy_lmi(x, y, config):
        calls["lmi"].append((x.clone(), y.clone(), config))
        return fake_lmi(x, y, config)

    monkeypatch.setattr(conditioning, "condition", spy_condition)
    monkeypatch.setattr(conditioning, "lmi_map", spy_lmi)
    lmi_config = LMIConfig(normalize=False, sigma=0.05)
    # training: the reference is the clean target batch; LMI(x0, u(x_t)) and LMI(x0, x0)
    train_diffusion(tmp_path, {"steps": 1, "size": 16, "batch": 2}, slices=slices, net_config=TINY,
                    schedule=SHORT, lmi_config=lmi_config, progress=False)
    # LMI(x0, x0) once for every training slice (the cache), then LMI(x0, u(x_t)) per step
    assert len(calls["condition"]) == 1 and len(calls["lmi"]) == 2
    (x_cache, y_cache, c_cache), (x1, y1, c1) = calls["lmi"]
    reference = calls["condition"][0]
    assert torch.equal(x_cache, torch.from_numpy(slices[:, None])) and torch.equal(y_cache, x_cache)
    assert torch.equal(x1, reference)
    assert any(torch.equal(reference[0, 0], torch.from_numpy(s)) for s in slices)
    assert 0 <= y1.min() and y1.max() <= 1 and c1 == c_cache == lmi_config
    # sampling with the trained model: the reference is the source; LMI(G, G) once, then LMI(G, u(x_t))
    calls["condition"].clear()
    calls["lmi"].clear()
    model, schedule, _ = load_denoiser(tmp_path / "checkpoint.pt")
    source = torch.rand(2, 1, 16, 16)
    samplers.sample(model, source, step_table(schedule.noise_schedule, "ddim", 3), SliceNoise(0, 2, (1, 16, 16)))
    assert len(calls["condition"]) == 3 and len(calls["lmi"]) == 1 + 3
    assert all(torch.equal(x, source) for x, _, _ in calls["lmi"])
    assert all(c == lmi_config for _, _, c in calls["lmi"])


def test_condition_maps_x_t_into_the_lmi_domain():
    x_t = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).reshape(1, 1, 1, 5)
    torch.testing.assert_close(conditioning.lmi_input(x_t),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]).reshape(1, 1, 1, 5))
    out = conditioning.condition(x_t.expand(2, 1, 8, 5).contiguous(), torch.rand(2, 1, 8, 5), None, LMIConfig())
    assert out.shape == (2, 3, 8, 5)


# ---------------------------------------------------------------- training
def test_one_training_step_updates_weights_with_a_finite_loss(tmp_path, slices):
    result = train_diffusion(tmp_path, {"steps": 1, "size": 16, "batch": 2}, slices=slices,
                             net_config=TINY, schedule=SHORT, progress=False)
    assert result["step"] == 1 and np.isfinite(result["loss"]) and not result["interrupted"]
    torch.manual_seed(0)
    initial = ScoreNet(TINY).state_dict()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    changed = [k for k, v in payload["model"].items() if not torch.equal(v, initial[k])]
    assert len(changed) > len(initial) // 2
    assert set(payload) == {"format", "version", "step", "total_steps", "model", "ema", "optimizer",
                            "rng", "noise_generator", "sampler", "config", "target", "preprocess",
                            "data_dir"}
    assert payload["format"] == "galip-midiffusion" and payload["config"]["lmi"] == LMIConfig().to_dict()
    assert set(payload["config"]) == {"train", "net", "schedule", "lmi", "data_range"}
    assert payload["target"]["name"] == "T2" and payload["preprocess"]["size"] == 16


def test_resume_equals_an_uninterrupted_run(tmp_path, slices):
    kwargs = dict(slices=slices, net_config=TINY, schedule=SHORT, progress=False)
    straight = train_diffusion(tmp_path / "a", {"steps": 4, "size": 16, "batch": 2, "seed": 7}, **kwargs)
    train_diffusion(tmp_path / "b", {"steps": 2, "size": 16, "batch": 2, "seed": 7}, **kwargs)
    resumed = train_diffusion(tmp_path / "b", {"steps": 4}, resume=True, slices=slices, progress=False)
    assert straight["step"] == resumed["step"] == 4 and straight["loss"] == resumed["loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]) for k in a["ema"]["module"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                    b["optimizer"]["state"][0].values()))
    assert torch.equal(a["noise_generator"], b["noise_generator"]) and a["sampler"] == b["sampler"]


def test_resume_refuses_contradicting_settings(tmp_path, slices):
    from galip.runtime.errors import ConfigError
    kwargs = dict(slices=slices, net_config=TINY, schedule=SHORT, progress=False)
    train_diffusion(tmp_path, {"steps": 1, "size": 16, "batch": 2}, **kwargs)
    with pytest.raises(ConfigError, match="--batch 3 contradicts"):
        train_diffusion(tmp_path, {"steps": 2, "batch": 3}, resume=True, **kwargs)
    with pytest.raises(ConfigError, match="already exists"):
        train_diffusion(tmp_path, {"steps": 2}, **kwargs)


def test_first_ctrl_c_finishes_the_step_and_saves(tmp_path, slices, monkeypatch):
    original, calls = trainer_module.training_loss, []

    def training_loss(*args):                              # Ctrl-C during the second step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(trainer_module, "training_loss", training_loss)
    result = train_diffusion(tmp_path, {"steps": 4, "size": 16, "batch": 2}, slices=slices,
                             net_config=TINY, schedule=SHORT, progress=False)
    assert result["interrupted"] and result["step"] == 2 and len(calls) == 2
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


# ---------------------------------------------------------------- CLI
@pytest.fixture
def cli():
    app = typer.Typer()
    app.command()(diffusion)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"subjects": [{"id": "sub-000", "files": {}}]}))
    return folder


@pytest.mark.parametrize("args,message", [
    (["--target", "T9"], "unknown domain"),
    (["--target", "T2", "--size", "12"], "multiple of 8"),
    (["--target", "T2", "--steps", "0"], ""),
    (["--target", "T2", "--batch", "0"], ""),
    (["--target", "T2", "--resume"], "does not exist"),
    (["--target", "T2", "--seed", "x"], ""),
])
def test_cli_bad_arguments_exit_2(cli, data_dir, tmp_path, args, message):
    result = cli("--data", data_dir, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_data_folder_without_index_exits_2(cli, tmp_path):
    result = cli("--data", tmp_path, "--out", tmp_path / "out", "--target", "T2")
    assert result.exit_code == 2 and "index.json" in result.output


def test_cli_refuses_to_overwrite_a_checkpoint(cli, data_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pt").write_bytes(b"")
    result = cli("--data", data_dir, "--out", tmp_path / "out", "--target", "t2w")
    assert result.exit_code == 2 and "--resume" in result.output


def test_cli_resume_from_a_generator_checkpoint_exits_2_with_one_line(cli, data_dir, tmp_path):
    save_checkpoint(tmp_path / "out" / "checkpoint.pt", {"format": "galip-i2i-generator", "version": 1,
                                                         "step": 1, "train_config": {"size": 32}})
    result = cli("--data", data_dir, "--out", tmp_path / "out", "--target", "T2", "--resume")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "'galip-i2i-generator' checkpoint" in lines[0], result.output
