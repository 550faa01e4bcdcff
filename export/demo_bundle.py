"""The recipe of the demo bundle shipped in ``runtime/bundles/demo`` (``make demo-bundle``).

A clip-free I2I-Galip generator (base width 16 instead of the paper's 32: 3.8M instead
of 13.2M parameters, 2.2x fewer seconds per step on one CPU core, so about twice the
steps fit in the same hours) trained on 2 mm ``galip-data`` head phantoms (seed 1;
evaluation uses other seeds), exported to ONNX from checkpoint copies that record the
2 mm grid it was trained on (``at_training_spacing``).

What the recipe changes against the paper's, and why (docs/training.md has the numbers):
- every axial slice at the volume's natural rate, empty ones above the head included
  (``min_foreground=0``): a model that never saw an empty slice invents blobs in one;
- random 64 x 64 windows of the slices (``crop=64``): a quarter of a slice's cost,
  centred on the anatomy where a slice has some (a discriminator learns nothing from
  air against air: with uniform windows it barely told a T1 from a T2 after 800 steps);
- discriminator lr 4e-4, twice the generator's (TTUR), and a whole-window intensity
  histogram head beside each PatchGAN head (``histogram_head``): which tissue is bright
  is what tells a T2 from a T1, and a 38-pixel patch learns that slowly (at equal lr
  and patches only, the generator stayed an identity for every target after 800 steps);
- identity weight 5 (half the cycle weight, CycleGAN's ratio) instead of 1 for the first
  1200 steps: at 1 the generator fell into a target-blind brightness flip that keeps the
  cycle loss low; then 2, since at 5 the generator learned the PD targets by step 1000 but
  kept T1 <-> T2 near an identity (only brightness changed, no contrast inversion);
- optionally (``--finetune-steps N``; 0, the shipped bundle's recipe, skips it) a second
  run starts from those networks (``init_from``) with training-free pseudo-targets
  (train/i2i/prior.py) for the pairs whose contrast sign unpaired data decides
  (T1 <-> T2): prior weight 50, then 10 from 60 % of its steps, identity 2, fresh
  optimisers and schedule. The GAN alone never found the T1 <-> T2 inversion; 2400 such
  steps moved those two directions by 1.5-4.4 dB on validation phantoms (seed 77, two
  runs) at the cost of PD -> T1, so the shipped generator has none (docs/training.md).

The MIDiffusion score network for T2 beside it (docs/diffusion.md): the reference design at
base width 32 (2,245,185 parameters; the paper's 64 has 8.95M and costs 4x per step, and the
volume-in-minutes goal of a 2-core CPU needs about 0.1 s per step and slice), trained on
random 80 x 80 windows centred on anatomy (batch 6) of every T2 slice with foreground, lr
2e-4, EMA 0.999 (0.9999 averages over more steps than a CPU run has), LMI(x0, x0) cached
per slice; exported with the sampler ``galip-eval samplers`` chose.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEMO_DATA = dict(subjects=12, seed=1, spacing=2.0, noise=0.02)
DEMO_DOMAINS = "T1,T2,PD"
DEMO_STEPS = 3200
DEMO_IDENTITY_LATE_FROM = 1200   # identity weight 5 -> 2 here (docs/training.md)
DEMO_FINETUNE_STEPS = 0          # the shipped generator has no fine-tuning run (docs/training.md)
DEMO_PRIOR, DEMO_PRIOR_LATE = 50.0, 10.0   # the fine-tuning's prior weight, and from 60 % of it on
DEMO_DIFFUSION = dict(target="T2", steps=4213, crop=80, batch=6, lr=2e-4, ema_decay=0.999)
DEMO_DIFFUSION_WIDTH = 32
DEMO_SAMPLER = "dpmpp2m:5"      # cheapest within 0.5 dB of DDPM-1000 in galip-eval samplers (docs/diffusion.md)


def demo_config(steps: int = DEMO_STEPS):
    """The demo generator's TrainConfig (see the module docstring for each choice)."""
    from galip.train.i2i.losses import LossWeights
    from galip.train.i2i.trainer import TrainConfig
    from galip.train.i2i.unet import UNetConfig

    return TrainConfig(steps=steps, size=128, batch=4, backbone="none", seed=0,
                       unet=UNetConfig(base_channels=16, groups=16),
                       weights=LossWeights(identity=5.0), crop=64, crop_on_foreground=True,
                       min_foreground=0.0, axes=(2,), lr_d=4e-4, histogram_head=True,
                       identity_late=2.0, identity_late_from=DEMO_IDENTITY_LATE_FROM)


def finetune_config(steps: int):
    """The second run's TrainConfig: the demo's with the pseudo-target prior (module docstring)."""
    from galip.train.i2i.losses import LossWeights

    config = demo_config(steps)
    config.weights = LossWeights(identity=2.0, prior=DEMO_PRIOR)
    config.identity_late = None
    config.prior_late, config.prior_late_from = DEMO_PRIOR_LATE, int(0.6 * steps)
    return config


def make_demo_bundle(work: Path, bundle: Path, steps: int = DEMO_STEPS, export: bool = True,
                     finetune_steps: int = DEMO_FINETUNE_STEPS) -> Path:
    """data → train → (``finetune_steps`` > 0) fine-tune with the prior (both resumable) →
    export into ``bundle``; returns the exported checkpoint's path."""
    from galip.export.bundle_writer import ExportOptions, export_checkpoint
    from galip.train.data_cli import write_dataset
    from galip.train.i2i.loop import train_generator

    data, run = work / "data", work / "run"
    if not (data / "index.json").is_file():
        write_dataset(data, **DEMO_DATA)
    checkpoint = run / "checkpoint.pt"
    train_generator(run, data, DEMO_DOMAINS, {}, save_every=100, resume=checkpoint.is_file(),
                    progress=True, trainer_config=demo_config(steps))
    tuned = checkpoint
    if finetune_steps > 0:
        tuned = work / "finetune" / "checkpoint.pt"
        resume = tuned.is_file()
        train_generator(tuned.parent, data, DEMO_DOMAINS, {}, save_every=100, resume=resume, progress=True,
                        trainer_config=finetune_config(finetune_steps), init_from=None if resume else checkpoint)
    if not export:
        return tuned
    export_checkpoint(at_training_spacing(tuned, tuned.with_name("export.pt")), bundle,
                      ExportOptions(fp16=False, engines=False))
    diffusion = train_demo_diffusion(work, data)
    export_checkpoint(at_training_spacing(diffusion, work / "diffusion" / "export.pt"), bundle,
                      ExportOptions(fp16=False, engines=False, sampler=DEMO_SAMPLER))
    return tuned


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
    parser.add_argument("--finetune-steps", type=int, default=DEMO_FINETUNE_STEPS,
                        help="steps of a second run with the pseudo-target prior (0: none, as shipped)")
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="train (or resume) only; export later")
    args = parser.parse_args()
    make_demo_bundle(args.work, args.bundle, args.steps, args.export, args.finetune_steps)


if __name__ == "__main__":
    main()
