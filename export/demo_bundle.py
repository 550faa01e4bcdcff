"""The recipe of the demo bundle shipped in ``runtime/bundles/demo`` (``make demo-bundle``).

A clip-free I2I-Galip generator (base width 16 instead of the paper's 32: 3.8M instead
of 13.2M parameters, 2.2x fewer seconds per step on one CPU core, so about twice the
steps fit in the same hours) trained on 2 mm ``galip-data`` head phantoms (seed 1;
evaluation uses other seeds), exported to ONNX from checkpoint copies that record the
2 mm grid it was trained on (``at_training_spacing``).

The shipped generator (``demo_config``) is trained on training-free pseudo-targets alone
(train/i2i/prior.py; docs/training.md, "Bias-free translation"), 3000 steps:
- on bias-free slices (``bias_field="n4"``): the coil's field, which a subject's
  contrasts share, is divided out before the model and given back after it, by the
  runtime as in training (runtime/bias.py);
- L1 to the pseudo-targets (prior 10) and identity 1; no cycle, no adversarial term (a
  step costs 0.56x of the full objective's, and 3200 GAN steps never found the T1 <-> T2
  inversion);
- an intensity curve beside the U-Net's output head (``curve_knots=16``): an inversion or
  a tissue re-weighting is a curve of the input intensity, which the GroupNorm'd head
  cannot express directly;
- PD sources back-translated (``prior_back_translate``): a PDw's CSF and white matter
  differ by 3 %, so no match of a PD's intensities gives a T1 or T2; PD inputs are made
  from the T1 and T2 subjects' pseudo-targets for PD instead, paired with those subjects;
- split sign votes get the plain match (``prior_split_vote="plain"``);
- every axial slice at the volume's natural rate, empty ones included
  (``min_foreground=0``), random 64 x 64 windows centred on anatomy (``crop=64``).

``gan_config`` is the cycle-GAN recipe of the generator shipped before (3200 steps;
identity 5 then 2, TTUR, a histogram head per domain), ``finetune_config`` its
fine-tuning with the prior; docs/training.md has their numbers.

The MIDiffusion score network for T2 beside it (docs/diffusion.md): the reference design at
base width 32 (2,245,185 parameters; the paper's 64 has 8.95M and costs 4x per step, and the
volume-in-minutes goal of a 2-core CPU needs about 0.1 s per step and slice), trained on
random 80 x 80 windows centred on anatomy (batch 6) of every T2 slice with foreground, lr
2e-4, EMA 0.999 (0.9999 averages over more steps than a CPU run has), LMI(x0, x0) cached
per slice; exported with the sampler ``galip-eval samplers`` chose. It was trained on T2
slices as they are, so its manifest entry has no bias field and the runtime gives it
the source unchanged.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEMO_DATA = dict(subjects=12, seed=1, spacing=2.0, noise=0.02)
DEMO_DOMAINS = "T1,T2,PD"
DEMO_STEPS = 3000
DEMO_PRIOR, DEMO_IDENTITY = 10.0, 1.0   # the only loss terms of the shipped generator
DEMO_CURVE_KNOTS = 16
DEMO_BACK_TRANSLATE = ("PD",)           # sources whose intensities do not tell CSF from white matter
GAN_STEPS = 3200                        # the cycle-GAN generator shipped before (gan_config)
GAN_IDENTITY_LATE_FROM = 1200           # its identity weight 5 -> 2 here (docs/training.md)
GAN_PRIOR, GAN_PRIOR_LATE = 50.0, 10.0  # its fine-tuning's prior weight, and from 60 % of it on
DEMO_DIFFUSION = dict(target="T2", steps=4213, crop=80, batch=6, lr=2e-4, ema_decay=0.999)
DEMO_DIFFUSION_WIDTH = 32
DEMO_SAMPLER = "dpmpp2m:5"      # cheapest within 0.5 dB of DDPM-1000 in galip-eval samplers (docs/diffusion.md)


def gan_config(steps: int = GAN_STEPS):
    """The cycle-GAN recipe of the generator shipped before (module docstring)."""
    from galip.train.i2i.losses import LossWeights
    from galip.train.i2i.trainer import TrainConfig
    from galip.train.i2i.unet import UNetConfig

    return TrainConfig(steps=steps, size=128, batch=4, backbone="none", seed=0,
                       unet=UNetConfig(base_channels=16, groups=16),
                       weights=LossWeights(identity=5.0), crop=64, crop_on_foreground=True,
                       min_foreground=0.0, axes=(2,), lr_d=4e-4, histogram_head=True,
                       identity_late=2.0, identity_late_from=GAN_IDENTITY_LATE_FROM)


def finetune_config(steps: int):
    """``gan_config`` fine-tuned with the pseudo-target prior (docs/training.md)."""
    from galip.train.i2i.losses import LossWeights

    config = gan_config(steps)
    config.weights = LossWeights(identity=2.0, prior=GAN_PRIOR)
    config.identity_late = None
    config.prior_late, config.prior_late_from = GAN_PRIOR_LATE, int(0.6 * steps)
    return config


def demo_config(steps: int = DEMO_STEPS):
    """The shipped generator's TrainConfig (module docstring): ``gan_config``'s networks,
    windows and schedule, trained on bias-free pseudo-targets alone."""
    from galip.train.i2i.losses import LossWeights

    config = gan_config(steps)
    config.weights = LossWeights(cycle=0.0, adv=0.0, identity=DEMO_IDENTITY, prior=DEMO_PRIOR)
    config.identity_late = None
    config.prior_split_vote, config.prior_back_translate = "plain", DEMO_BACK_TRANSLATE
    config.unet.curve_knots = DEMO_CURVE_KNOTS
    config.bias_field = "n4"
    return config


def make_demo_bundle(work: Path, bundle: Path, steps: int = DEMO_STEPS, export: bool = True) -> Path:
    """data → train (resumable) → export into ``bundle``; returns the generator's checkpoint."""
    from galip.export.bundle_writer import ExportOptions, export_checkpoint
    from galip.train.data_cli import write_dataset
    from galip.train.i2i.loop import train_generator

    data, run = work / "data", work / "run"
    if not (data / "index.json").is_file():
        write_dataset(data, **DEMO_DATA)
    checkpoint = run / "checkpoint.pt"
    train_generator(run, data, DEMO_DOMAINS, {}, save_every=100, resume=checkpoint.is_file(),
                    progress=True, trainer_config=demo_config(steps))
    if not export:
        return checkpoint
    export_checkpoint(at_training_spacing(checkpoint, checkpoint.with_name("export.pt")), bundle,
                      ExportOptions(fp16=False, engines=False))
    diffusion = train_demo_diffusion(work, data)
    export_checkpoint(at_training_spacing(diffusion, work / "diffusion" / "export.pt"), bundle,
                      ExportOptions(fp16=False, engines=False, sampler=DEMO_SAMPLER))
    return checkpoint


def train_demo_diffusion(work: Path, data: Path) -> Path:
    """Train (or resume) the demo score network; returns its checkpoint."""
    from galip.train.midiffusion.scorenet import ScoreNetConfig
    from galip.train.midiffusion.trainer import train_diffusion
    checkpoint = work / "diffusion" / "checkpoint.pt"
    resume = checkpoint.is_file()
    train_diffusion(checkpoint.parent, DEMO_DIFFUSION, data_dir=data, resume=resume,
                    net_config=None if resume else ScoreNetConfig.with_width(DEMO_DIFFUSION_WIDTH))
    return checkpoint


def at_training_spacing(checkpoint: Path, out: Path) -> Path:
    """A copy of a checkpoint that records the 2 mm grid it was trained on (it read the 2 mm
    volumes without resampling, ``spacing`` None), so the runtime resamples other inputs to
    it and both models share one preprocessing in the bundle."""
    from galip.train.checkpoint import load_checkpoint, save_checkpoint
    payload = load_checkpoint(checkpoint)
    payload["preprocess"]["spacing"] = DEMO_DATA["spacing"]
    if "config" in payload:                          # a diffusion checkpoint keeps it twice
        payload["config"]["train"]["spacing"] = DEMO_DATA["spacing"]
    save_checkpoint(out, payload)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("demo_out/bundle_work"))
    parser.add_argument("--bundle", type=Path, default=Path("runtime/bundles/demo"))
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="train (or resume) only; export later")
    args = parser.parse_args()
    make_demo_bundle(args.work, args.bundle, args.steps, args.export)


if __name__ == "__main__":
    main()
