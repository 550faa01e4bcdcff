"""The recipe of the demo bundle shipped in ``runtime/bundles/demo`` (``make demo-bundle``).

A small clip-free I2I-Galip generator (base width 16 instead of the paper's 32, 3.8M
parameters) trained on 2 mm ``galip-data`` phantoms, exported to ONNX; the manifest's
in-plane spacing is set to 2 mm, the grid it was trained on. It exists so that ``make demo``
translates a volume on a plain CPU box; it is not the reference model. The shipped one
was stopped at step 850 of 1500 (about 1 h on 2 shared cores): T1→T2 PSNR 20.4 dB / SSIM
0.82 against the paired phantom T2 (17.6 dB / 0.61 for the untranslated T1), with
hallucinated stripes on near-empty slices above the head (training skips slices under
5 % foreground). Train the reference configuration with ``galip-train generator``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from galip.runtime.bundle import write_manifest

DEMO_DATA = dict(subjects=6, seed=1, spacing=2.0, noise=0.02)
DEMO_DOMAINS = "T1,T2,PD"


def make_demo_bundle(work: Path, bundle: Path, steps: int = 1500) -> Path:
    """data → train (resumable) → export into ``bundle``; returns the checkpoint path."""
    from galip.export.bundle_writer import ExportOptions, export_checkpoint
    from galip.train.data_cli import write_dataset
    from galip.train.i2i.loop import train_generator
    from galip.train.i2i.trainer import TrainConfig
    from galip.train.i2i.unet import UNetConfig

    data, run = work / "data", work / "run"
    if not (data / "index.json").is_file():
        write_dataset(data, **DEMO_DATA)
    checkpoint = run / "checkpoint.pt"
    config = TrainConfig(steps=steps, size=128, batch=4, backbone="none", seed=0,
                         unet=UNetConfig(base_channels=16, groups=16))
    train_generator(run, data, DEMO_DOMAINS, {}, save_every=50, resume=checkpoint.is_file(),
                    progress=True, trainer_config=config)
    export_checkpoint(checkpoint, bundle, ExportOptions(fp16=False, engines=False))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["preprocess"]["spacing"] = DEMO_DATA["spacing"]   # the grid it was trained on
    write_manifest(bundle, manifest)
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("demo_out/bundle_work"))
    parser.add_argument("--bundle", type=Path, default=Path("runtime/bundles/demo"))
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    make_demo_bundle(args.work, args.bundle, args.steps)


if __name__ == "__main__":
    main()
