"""I2I-Galip training: steps in each mode, EMA, resume equivalence, CLI errors (CPU, tiny)."""
from __future__ import annotations

import json
import os
import signal

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from galip.runtime.domains import parse_domains
from galip.runtime.errors import ConfigError
from galip.train.checkpoint import load_checkpoint, save_checkpoint
from galip.train.i2i import loop
from galip.train.i2i import trainer as trainer_module
from galip.train.i2i.backbone import TinyViTConfig
from galip.train.i2i.cli import generator
from galip.train.i2i.model import generator_from_checkpoint
from galip.train.i2i.trainer import I2ITrainer, TrainConfig, lr_factor, pick_domains
from galip.train.i2i.unet import UNetConfig
from galip.train.interrupt import deferred_interrupt


DOMAINS = "T1,T2,PD"


def tiny_config(mode: str, steps: int = 4) -> TrainConfig:
    return TrainConfig(
        steps=steps, size=32, batch=2, backbone=mode, seed=3,
        unet=UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4, head_channels=8,
                        attention_ds=(2,), context_dim=16),
        tiny=TinyViTConfig(image_size=32, patch=8, width=16, depth=4, heads=2, taps=(1, 2, 3, 4),
                           embed_dim=24, context_dim=16, context_length=8, text_width=16),
        context_tokens=4, conv_channels=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A galip-data-shaped folder: 3 subjects × T1w/T2w/PDw, 40 × 40 × 4 volumes."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    subjects = []
    for s in range(3):
        sid = f"sub-{s:03d}"
        (root / sid).mkdir()
        blob = np.exp(-((yy - 20 - s) ** 2 + (xx - 20) ** 2) / 150.0)
        files = {}
        for k, suffix in enumerate(("T1w", "T2w", "PDw")):
            vol = np.stack([blob ** (k + 1) + 0.01 * rng.random((40, 40)) for _ in range(4)], axis=-1)
            files[suffix] = f"{sid}/{sid}_{suffix}.nii.gz"
            nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), root / files[suffix])
        subjects.append({"id": sid, "index": s, "files": files})
    (root / "index.json").write_text(json.dumps({"subjects": subjects}))
    return root


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ one step
@pytest.mark.parametrize("mode", ["tiny", "none"])
def test_one_step_updates_generator_and_discriminator(mode):
    trainer = I2ITrainer(tiny_config(mode), parse_domains(DOMAINS))
    g0, d0 = params(trainer.generator), params(trainer.discriminator)
    x_a, x_b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    losses = trainer.train_step(x_a, x_b, 0, 2)
    assert all(np.isfinite(v) for v in losses.values())
    expected = {"adv", "cycle", "identity", "G", "D"} | ({"clip", "cls"} if mode == "tiny" else set())
    assert set(losses) == expected
    g1, d1 = params(trainer.generator), params(trainer.discriminator)
    assert any(not torch.equal(g0[k], g1[k]) for k in g0 if k.startswith("unet."))
    assert any(not torch.equal(d0[k], d1[k]) for k in d0)
    # zero-initialised output convs: the context gets gradients from the third step on
    for _ in range(2):
        trainer.train_step(x_a, x_b, 2, 1)
    if mode == "none":                                   # learned per-domain context is trained
        assert not torch.equal(g0["context"], trainer.generator.context.detach())
        assert trainer.config.weights.clip == trainer.config.weights.cls == 0
    else:                                                # caption context stays frozen
        assert torch.equal(g0["context"], trainer.generator.context)


def test_ema_update_matches_hand_computation():
    trainer = I2ITrainer(tiny_config("none"), parse_domains(DOMAINS))
    snapshots = [{k: v.detach().clone() for k, v in trainer.generator.named_parameters()}]
    for a, b in ((1, 0), (2, 1)):
        trainer.train_step(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), a, b)
        snapshots.append({k: v.detach().clone() for k, v in trainer.generator.named_parameters()})
    p0, p1, p2 = snapshots
    shadow = dict(trainer.ema.module.named_parameters())
    changed = 0
    for name in p0:
        # the EMA starts as a copy of p0; shadow ← 0.99 · shadow + 0.01 · weights after each step
        expected = 0.99 * (0.99 * p0[name] + 0.01 * p1[name]) + 0.01 * p2[name]
        torch.testing.assert_close(shadow[name], expected, rtol=1e-6, atol=1e-7)
        changed += not torch.equal(p0[name], p2[name])
    assert changed > 0


def test_schedule_is_constant_then_linear_to_zero():
    assert [lr_factor(s, 8) for s in range(9)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    trainer = I2ITrainer(tiny_config("none", steps=4), parse_domains("T1,T2"))
    lrs = []
    for _ in range(4):
        lrs.append(trainer.opt_g.param_groups[0]["lr"])
        trainer.train_step(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), 0, 1)
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-4, 1e-4])
    assert trainer.opt_d.param_groups[0]["lr"] == 0


def test_domain_pairs_differ_and_cover_all_domains():
    pairs = {pick_domains(0, s, 3) for s in range(60)}
    assert all(a != b for a, b in pairs) and len(pairs) == 6


def test_class_embedding_rows_follow_the_registry():
    trainer = I2ITrainer(tiny_config("none"), parse_domains("T1,CT"))
    assert trainer.config.unet.n_classes == 4            # CT has class id 3
    assert trainer.generator.class_ids.tolist() == [0, 3]


# ------------------------------------------------------------------ checkpoint and resume
def _interrupt_after(monkeypatch, n: int):
    """Deliver a real SIGINT once ``n`` steps are done (as a user's Ctrl-C would)."""
    original = I2ITrainer.step_from

    def step_from(self, sampler):
        losses = original(self, sampler)
        if self.step == n:
            os.kill(os.getpid(), signal.SIGINT)
        return losses

    monkeypatch.setattr(I2ITrainer, "step_from", step_from)


@pytest.mark.parametrize("mode", ["tiny", "none"])
def test_straight_run_equals_interrupted_and_resumed_run(data_dir, tmp_path, monkeypatch, mode):
    given = {"backbone": mode}
    straight = loop.train_generator(tmp_path / "a", data_dir, DOMAINS, given, save_every=100,
                                    progress=False, trainer_config=tiny_config(mode))
    assert straight["step"] == 4 and not straight["interrupted"]

    _interrupt_after(monkeypatch, 2)
    first = loop.train_generator(tmp_path / "b", data_dir, DOMAINS, given, save_every=100,
                                 progress=False, trainer_config=tiny_config(mode))
    assert first["interrupted"] and first["step"] == 2
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    monkeypatch.undo()
    second = loop.train_generator(tmp_path / "b", data_dir, None, {}, resume=True, progress=False)
    assert second["step"] == 4 and not second["interrupted"]

    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key in ("generator", "discriminator"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6)
    for name in a["generator_ema"]["module"]:
        torch.testing.assert_close(a["generator_ema"]["module"][name], b["generator_ema"]["module"][name],
                                   rtol=1e-5, atol=1e-6)
    assert a["sampler"] == b["sampler"]


def test_checkpoint_holds_what_export_needs(data_dir, tmp_path):
    loop.train_generator(tmp_path, data_dir, "T1,T2", {"backbone": "none", "steps": 1}, progress=False,
                         trainer_config=tiny_config("none"))
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)   # plain data only
    assert {"mode", "unet_config", "domains", "context", "generator", "generator_ema", "discriminator",
            "opt_g", "opt_d", "sched_g", "sched_d", "step", "rng", "sampler", "preprocess",
            "train_config"} <= set(payload)
    assert payload["mode"] == "none" and payload["step"] == 1
    assert [(d["name"], d["caption"], d["class_id"]) for d in payload["domains"]] == [
        ("T1", "this MRI is T1-weighted", 0), ("T2", "this MRI is T2-weighted", 1)]
    unet, context, domains = generator_from_checkpoint(payload)
    assert context.shape == (2, 4, 16)
    with torch.no_grad():
        y = unet(torch.rand(1, 1, 32, 32), context[1:2], torch.tensor([domains[1]["class_id"]]))
    assert y.shape == (1, 1, 32, 32)


# ------------------------------------------------------------------ CLI errors
@pytest.fixture()
def cli():
    app = typer.Typer()
    app.command()(generator)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("case, needle", [
    ("unknown", "unknown domain"), ("single", "at least 2"), ("missing", "does not exist"),
    ("empty", "index.json"), ("size", "multiple of 32"), ("resume", "does not exist"),
    ("no-domains", "--domains is missing"), ("crop", "--crop 48"), ("crop-big", "up to --size 64"),
    ("curve", "--curve-knots 1"),
])
def test_bad_arguments_exit_2_with_one_line(cli, data_dir, tmp_path, case, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "unknown": ["--data", data_dir, "--domains", "T1,FLAIR"],
        "single": ["--data", data_dir, "--domains", "T1"],
        "missing": ["--data", tmp_path / "nope", "--domains", DOMAINS],
        "empty": ["--data", empty, "--domains", DOMAINS],
        "size": ["--data", data_dir, "--domains", DOMAINS, "--size", "48"],
        "resume": ["--data", data_dir, "--domains", DOMAINS, "--resume"],
        "no-domains": ["--data", data_dir],
        "crop": ["--data", data_dir, "--domains", DOMAINS, "--crop", "48"],
        "crop-big": ["--data", data_dir, "--domains", DOMAINS, "--size", "64", "--crop", "96"],
        "curve": ["--data", data_dir, "--domains", DOMAINS, "--curve-knots", "1"],
    }[case]
    result = cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_resume_with_a_different_setting_is_refused(data_dir, tmp_path):
    loop.train_generator(tmp_path, data_dir, "T1,T2", {"backbone": "none", "steps": 1}, progress=False,
                         trainer_config=tiny_config("none"))
    from galip.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="differs from the checkpoint"):
        loop.train_generator(tmp_path, data_dir, None, {"steps": 7}, resume=True, progress=False)
    with pytest.raises(ConfigError, match="exists; pass --resume"):
        loop.train_generator(tmp_path, data_dir, "T1,T2", {}, progress=False)


def test_curve_knots_set_the_unet_and_a_resume_must_keep_them(data_dir, tmp_path):
    from galip.runtime.errors import ConfigError
    from galip.train.checkpoint import load_checkpoint
    loop.train_generator(tmp_path, data_dir, "T1,T2", {"backbone": "none", "steps": 2, "curve_knots": 4},
                         save_every=1, progress=False, trainer_config=tiny_config("none"))
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["unet_config"]["curve_knots"] == 4
    assert any(key.startswith("unet.curve.") for key in payload["generator"])
    with pytest.raises(ConfigError, match="--curve-knots 8 differs from the checkpoint's 4"):
        loop.train_generator(tmp_path, data_dir, None, {"curve_knots": 8}, resume=True, progress=False)
    loop.train_generator(tmp_path, data_dir, None, {"curve_knots": 4}, resume=True, progress=False)


def test_a_bias_free_run_records_it_for_the_bundle_and_a_resume_must_keep_it(data_dir, tmp_path):
    from galip.runtime.errors import ConfigError
    from galip.train.checkpoint import load_checkpoint
    loop.train_generator(tmp_path, data_dir, "T1,T2", {"backbone": "none", "steps": 2, "bias_field": "n4"},
                         save_every=1, progress=False, trainer_config=tiny_config("none"))
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["preprocess"]["bias_field"] == "n4" and payload["train_config"]["bias_field"] == "n4"
    with pytest.raises(ConfigError, match="--bias-field none differs from the checkpoint's n4"):
        loop.train_generator(tmp_path, data_dir, None, {"bias_field": "none"}, resume=True, progress=False)


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------ non-finite losses
def test_non_finite_loss_raises_before_the_update(monkeypatch):
    def weights(module):        # parameters only: spectral norm's power iteration moves its buffers
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    trainer = I2ITrainer(tiny_config("none"), parse_domains(DOMAINS))
    g0, ema0, d0 = weights(trainer.generator), weights(trainer.ema.module), weights(trainer.discriminator)
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(ConfigError, match="non-finite G loss at step 1"):
        trainer.train_step(x * float("nan"), x, 0, 1)
    assert trainer.step == 0 and trainer.opt_g.state == {} and trainer.opt_d.state == {}
    for before, module in ((g0, trainer.generator), (ema0, trainer.ema.module), (d0, trainer.discriminator)):
        assert all(torch.equal(before[k], v) for k, v in weights(module).items())
    # a bad discriminator loss stops before the discriminator's update
    monkeypatch.setattr(trainer_module, "lsgan_discriminator", lambda real, fake: real.sum() * float("inf"))
    with pytest.raises(ConfigError, match="non-finite D loss at step 1"):
        trainer.train_step(x, x, 0, 1)
    assert trainer.step == 0 and trainer.opt_d.state == {}
    assert all(torch.equal(d0[k], v) for k, v in weights(trainer.discriminator).items())


def test_nan_loss_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, cli):
    original = I2ITrainer.train_step

    def poisoned(self, x_a, x_b, a, b):                   # the third step sees a NaN slice
        if self.step == 2:
            x_a = x_a * float("nan")
        return original(self, x_a, x_b, a, b)

    monkeypatch.setattr(I2ITrainer, "train_step", poisoned)
    with pytest.raises(ConfigError, match="non-finite G loss at step 3"):
        loop.train_generator(tmp_path, data_dir, DOMAINS, {"backbone": "none"}, save_every=2,
                             progress=False, trainer_config=tiny_config("none"))
    checkpoint = tmp_path / "checkpoint.pt"
    saved = load_checkpoint(checkpoint)
    assert saved["step"] == 2
    for key in ("generator", "discriminator"):
        assert all(torch.isfinite(v).all() for v in saved[key].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in saved["generator_ema"]["module"].values()
               if v.is_floating_point())

    data = checkpoint.read_bytes()
    result = cli("--data", data_dir, "--out", tmp_path, "--resume")
    assert result.exit_code == 2 and "non-finite G loss at step 3" in one_line(result)
    assert checkpoint.read_bytes() == data                # the CLI did not overwrite it either


# ------------------------------------------------------------------ resume from another model
def test_resume_from_a_diffusion_checkpoint_exits_2_with_one_line(cli, data_dir, tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": "galip-midiffusion", "version": 1, "step": 1,
                                                 "config": {"train": {"target": "T2"}}})
    result = cli("--data", data_dir, "--out", tmp_path, "--resume")
    assert result.exit_code == 2
    assert "'galip-midiffusion' checkpoint" in one_line(result) and "galip-i2i-generator" in one_line(result)


# ------------------------------------------------------------------ Ctrl-C
def test_first_ctrl_c_sets_the_flag_and_the_second_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with deferred_interrupt() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous
