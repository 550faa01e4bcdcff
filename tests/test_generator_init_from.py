"""galip-train generator --init-from: a new run starts from another checkpoint's networks."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from galip.export.bundle_writer import ExportOptions, export_checkpoint
from galip.runtime.domains import parse_domains
from galip.runtime.errors import ConfigError
from galip.train.checkpoint import load_checkpoint
from galip.train.i2i import loop
from galip.train.i2i.cli import generator
from galip.train.i2i.trainer import I2ITrainer

from test_generator_train import data_dir, tiny_config  # noqa: F401  (module fixture)

NONE = {"backbone": "none"}


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):  # noqa: F811
    """A 2-step T1,T2,PD run to start from."""
    out = tmp_path_factory.mktemp("source")
    loop.train_generator(out, data_dir, "T1,T2,PD", {**NONE, "steps": 2}, progress=False,
                         trainer_config=tiny_config("none"))
    return out / "checkpoint.pt"


def test_start_from_copies_the_networks_and_nothing_else(source):
    payload = load_checkpoint(source)
    trainer = I2ITrainer(tiny_config("none", steps=10), parse_domains("T1,T2,PD"))
    fresh = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    trainer.start_from(payload, source)
    for name, value in trainer.generator.state_dict().items():
        torch.testing.assert_close(value, payload["generator"][name], rtol=0, atol=0)
    assert any(not torch.equal(fresh[k], payload["generator"][k]) for k in fresh)   # it did change them
    for name, value in trainer.discriminator.state_dict().items():
        torch.testing.assert_close(value, payload["discriminator"][name], rtol=0, atol=0)
    for name, value in trainer.ema.state_dict()["module"].items():
        torch.testing.assert_close(value, payload["generator_ema"]["module"][name], rtol=0, atol=0)
    assert trainer.step == 0 and not trainer.opt_g.state and trainer.sched_g.last_epoch == 0


def test_start_from_averages_with_this_runs_ema_decay(source):
    payload = load_checkpoint(source)
    assert payload["generator_ema"]["decay"] != 0.5
    trainer = I2ITrainer(dataclasses.replace(tiny_config("none", steps=10), ema_decay=0.5),
                         parse_domains("T1,T2,PD"))
    trainer.start_from(payload, source)
    assert trainer.ema.decay == 0.5


def test_a_checkpoint_written_before_the_curve_option_still_starts_a_run(source):
    payload = load_checkpoint(source)
    del payload["unet_config"]["curve_knots"]                  # as checkpoints of older versions
    trainer = I2ITrainer(tiny_config("none", steps=10), parse_domains("T1,T2,PD"))
    trainer.start_from(payload, source)
    curved = tiny_config("none", steps=10)
    curved.unet = dataclasses.replace(curved.unet, curve_knots=4)
    with pytest.raises(ConfigError, match="another unet"):
        I2ITrainer(curved, parse_domains("T1,T2,PD")).start_from(load_checkpoint(source), source)


def test_a_fine_tuning_run_records_where_it_started(data_dir, source, tmp_path):  # noqa: F811
    tuned = loop.train_generator(tmp_path / "tuned", data_dir, "T1,T2,PD", {**NONE, "steps": 1},
                                 progress=False, trainer_config=tiny_config("none"), init_from=source)
    fresh = loop.train_generator(tmp_path / "fresh", data_dir, "T1,T2,PD", {**NONE, "steps": 1},
                                 progress=False, trainer_config=tiny_config("none"))
    a, b = load_checkpoint(tuned["checkpoint"]), load_checkpoint(fresh["checkpoint"])
    assert a["step"] == 1 and a["init_from"] == {"checkpoint": str(source), "trained_steps": 2}
    assert loop.trained_steps(a) == 3 and loop.trained_steps(b) == 1
    assert b["init_from"] is None
    assert any(not torch.allclose(a["generator"][k], b["generator"][k]) for k in a["generator"])
    bundle = export_checkpoint(tuned["checkpoint"], tmp_path / "bundle", ExportOptions(fp16=False, engines=False))
    assert json.loads(bundle.manifest.read_text())["models"]["generator"]["trained_steps"] == 3
    resumed = loop.train_generator(tmp_path / "tuned", data_dir, None, {"steps": 1}, resume=True, progress=False)
    assert load_checkpoint(resumed["checkpoint"])["init_from"] == a["init_from"]    # kept on resume


@pytest.mark.parametrize("domains, config, needle", [
    ("T1,T2", tiny_config("none"), "domains: ['T1', 'T2', 'PD'] there, ['T1', 'T2'] here"),
    ("T1,T2,PD", dataclasses.replace(tiny_config("none"), histogram_head=True), "histogram_head"),
])
def test_other_networks_are_refused_in_one_line(data_dir, source, tmp_path, domains, config, needle):  # noqa: F811
    with pytest.raises(ConfigError, match="has another") as error:
        loop.train_generator(tmp_path, data_dir, domains, NONE, progress=False, trainer_config=config,
                             init_from=source)
    assert needle in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_init_from_with_resume_exits_2_in_one_line(data_dir, source, tmp_path):  # noqa: F811
    loop.train_generator(tmp_path, data_dir, "T1,T2,PD", {**NONE, "steps": 1}, progress=False,
                         trainer_config=tiny_config("none"))
    app = typer.Typer()
    app.command()(generator)
    result = CliRunner().invoke(app, ["--data", str(data_dir), "--out", str(tmp_path), "--resume",
                                      "--init-from", str(source)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--init-from" in lines[0], result.output
