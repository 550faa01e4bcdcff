"""I2I-Galip training: generator (unet), frozen vision-language backbone (backbone),
discriminator heads (heads), losses (Eq. 1–12), one training step and its checkpoint
payload (trainer), the run loop (loop) and the ``galip-train generator`` command (cli).

Export rebuilds the generator with :func:`galip.train.i2i.model.generator_from_checkpoint`.
"""
