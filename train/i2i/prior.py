"""Training-free pseudo-targets that show the generator which way a contrast goes.

A cycle GAN with a clip-free discriminator does not find a contrast inversion on these
phantoms by itself: T1 <-> T2 settles on a re-weighted copy of the source
(docs/training.md). Histogram matching finds one at no cost when told the sign, and the
sign can be read off unpaired data. So each training slice carries, for every target
domain, a pseudo-target, and the generator is pulled towards it by an L1 term (the
``prior`` weight of Eq. 1) beside the adversarial, cycle and identity terms:

* the source volume is histogram-matched (scikit-image) to ANOTHER training subject's
  volume of the target domain (one of the target's own, unpaired, subjects), inside the
  brain and, separately, inside the rest of the head; air stays 0;
* with or without negating the source first: the sign whose joint histogram of
  (intensity, local mean within ``LOCAL_SIGMA`` voxels) lies closer to the reference's,
  by majority over the subjects, per domain pair and region; a pair whose brain vote
  is not unanimous (``DECISIVE``) gets no pseudo-target at all, or with
  ``split_vote="plain"`` the un-negated match (when unpaired data cannot tell, assume
  the contrast keeps its sign, as a histogram match does). Both signs reproduce the
  reference's intensity histogram exactly; only where the bright tissue sits (thin
  sulci and ventricles in a T2, broad white matter in a T1) tells them apart;
* optionally (``bias_correction``) both volumes are first divided by N4's estimate of
  their bias field (galip.runtime.bias, fitted in the head mask the runtime uses) and
  the match is multiplied back by the source's (a receive-coil property that a
  subject's contrasts share). A PD's tissue contrast is a few percent, so without it
  the +-10-20 % field decides which voxels the match darkens (the dark blotches of
  docs/training.md). The sign is still voted on the volumes as they are: on bias-free
  ones the vote turned unreliable. With ``bias_field="n4"`` the model itself trains on
  bias-free slices (as the runtime then feeds it): the slice and its pseudo-targets
  stay bias-free;
* ``back_translate``: source domains whose own intensities do not tell the tissues
  apart (a PDw's CSF and WM differ by ~3 %), so that no map of a voxel's intensity can
  say what it is in another contrast. Their own slices get no pseudo-targets; instead
  they get synthetic slices: every other domain's subjects as their pseudo-target for
  this domain, paired with that subject's slice and pseudo-targets. The generator has
  to learn from the anatomy where a PDw's CSF lies, which a histogram match cannot.

No paired image is used anywhere: the truth of a subject's other contrasts never enters.
The brain and head masks are those ``galip-data`` writes beside each subject; a data set
without them is matched inside the source's foreground as one region.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from galip.runtime.bias import flatten
from galip.runtime.domains import Domain
from galip.runtime.errors import ConfigError
from galip.runtime.volume import load_volume

from ..slices import (kept_slices, prepared_slices, preprocess_config, read_index, split_unpaired,
                      subject_file)

LOCAL_SIGMA = 2.0   # voxels: the scale at which "bright tissue is thin or broad" shows
BINS = 32
FOREGROUND = 0.05   # share of a region's 99.5th percentile: the fallback foreground
DECISIVE = 1.0      # share of subjects that must agree on a sign for the pair to get a prior (all)
SPLIT_VOTES = ("skip", "plain")   # what a pair whose vote splits gets: no pseudo-target, or the plain match


def joint_histogram(volume: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Normalised 2-D histogram of (intensity, Gaussian local mean) inside ``region``,
    both scaled by the region's 99.5th percentile."""
    scaled = volume / max(float(np.percentile(volume[region], 99.5)), 1e-12)
    local = ndimage.gaussian_filter(scaled, LOCAL_SIGMA)
    hist, _, _ = np.histogram2d(scaled[region], local[region], bins=BINS, range=[[0, 1.2], [0, 1.2]])
    return hist / max(hist.sum(), 1.0)


def matched(source: np.ndarray, reference: np.ndarray, region: np.ndarray,
            reference_region: np.ndarray, negate: bool) -> np.ndarray:
    """``±source`` inside ``region`` histogram-matched to ``reference`` inside
    ``reference_region``; 0 elsewhere."""
    from skimage.exposure import match_histograms
    out = np.zeros(source.shape, np.float32)
    if region.any() and reference_region.any():
        values = -source[region] if negate else source[region]
        out[region] = match_histograms(values, reference[reference_region])
    return out


def prefers_negation(source: np.ndarray, reference: np.ndarray, region: np.ndarray,
                     reference_region: np.ndarray,
                     matches: dict[bool, np.ndarray] | None = None) -> bool:
    """Whether the negated match's joint histogram is closer (L1) to the reference's.
    ``matches``: the two :func:`matched` volumes {negate: volume} when the caller has them."""
    if not (region.any() and reference_region.any()):
        return False
    if matches is None:
        matches = {negate: matched(source, reference, region, reference_region, negate) for negate in (False, True)}
    target = joint_histogram(reference, reference_region)
    distance = {negate: np.abs(joint_histogram(volume, region) - target).sum() for negate, volume in matches.items()}
    return distance[True] < distance[False]


class _Subject:
    """One subject's volume of one domain with its regions (brain, rest of the head), and
    with ``correct_bias`` its N4 bias field; ``flat`` is the volume divided by it."""

    def __init__(self, data_dir: Path, entry: dict, domain: Domain, correct_bias: bool, config: dict):
        volume = load_volume(subject_file(data_dir, entry, domain))
        self.data, self.affine = volume.data, volume.affine_mm
        files = entry.get("files", {})
        if "mask" in files and "head" in files:
            brain = load_volume(data_dir / files["mask"], require_signal=False).data > 0
            head = load_volume(data_dir / files["head"], require_signal=False).data > 0
            self.regions = {"brain": brain, "head": head & ~brain}
        else:
            self.regions = {"head": self.data > FOREGROUND * np.percentile(self.data, 99.5)}
        # the field the runtime would divide out of this volume (galip.runtime.bias)
        self.flat, self.bias = flatten(self.data, self.affine, domain.kind, "n4" if correct_bias else "none",
                                       config["percentiles"])


class _Matches:
    """Both candidate matches (plain and negated) of one source subject to one reference,
    per region, of the bias-free volumes where the subjects carry a bias field: computed
    once, then voted on and summed into the pseudo-target."""

    def __init__(self, source: _Subject, reference: _Subject):
        self.source, self.reference = source, reference
        self.volumes = {name: {negate: matched(source.flat, reference.flat, region,
                                               reference.regions.get(name, region), negate)
                               for negate in (False, True)}
                        for name, region in source.regions.items()}

    def votes(self) -> dict[str, bool]:
        """Per region, :func:`prefers_negation` on the volumes as they are: on bias-free
        ones the vote turned unreliable (T1 -> T2 fell from 4/4 to 0/4 for negation on the
        seed-1 phantoms, docs/training.md), so only the matching uses them."""
        corrected = self.source.bias is not None        # then the held matches are not the raw ones
        return {name: prefers_negation(self.source.data, self.reference.data, region,
                                       self.reference.regions.get(name, region),
                                       None if corrected else self.volumes[name])
                for name, region in self.source.regions.items()}

    def pseudo_target(self, negate: dict[str, bool], bias_free: bool = False) -> np.ndarray:
        """Each region's match with its sign (:func:`target_signs`), times the source's
        bias field if it has one and not ``bias_free``; 0 outside the regions."""
        target = sum(self.volumes[name][negate[name]] for name in self.volumes)
        return target if self.source.bias is None or bias_free else target * self.source.bias


def choose_signs(matches: Sequence[_Matches]) -> dict[str, float]:
    """Per region, the share of subjects for which :func:`prefers_negation` holds."""
    votes: dict[str, list[bool]] = {}
    for pair in matches:
        for name, vote in pair.votes().items():
            votes.setdefault(name, []).append(vote)
    return {name: float(np.mean(v)) for name, v in votes.items()}


def decided(shares: dict[str, float]) -> bool:
    """A pair gets a pseudo-target only if its brain (else its one region) vote is clear:
    on PD pairs neither sign matches well and the votes split, so the GAN alone decides."""
    share = shares.get("brain", shares.get("head", 0.5))
    return abs(share - 0.5) >= DECISIVE - 0.5


def target_signs(shares: dict[str, float], split_vote: str = "skip") -> dict[str, bool] | None:
    """Per region, whether a pair's pseudo-target negates the source (the majority's sign
    where the pair is :func:`decided`; no negation anywhere for an undecided pair under
    ``split_vote="plain"``); None: the pair gets no pseudo-target."""
    if split_vote not in SPLIT_VOTES:
        raise ValueError(f"split_vote {split_vote!r} is not one of {SPLIT_VOTES}")
    if decided(shares):
        return {name: share > 0.5 for name, share in shares.items()}
    return {name: False for name in shares} if split_vote == "plain" else None


def load_slices_with_pseudo_targets(data_dir: str | Path, domains: Sequence[Domain], size: int, *,
                                    min_foreground: float = 0.05, axes: Sequence[int] | None = None,
                                    split_vote: str = "skip", bias_correction: bool = False,
                                    bias_field: str = "none", back_translate: Sequence[str] = (),
                                    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Training slices with their pseudo-targets, and the signs chosen.

    Returns ``{domain: (n, 1 + len(domains), size, size)}`` float32 in [0, 1] (channel 0
    the slice itself as :func:`~galip.train.slices.load_training_slices` gives it,
    channel 1 + b the pseudo-target for domain ``b``, prepared as the runtime prepares a
    volume of ``b``; the domain's own channel is the slice again) and
    ``{"A->B": {region: share of subjects voting for negation}}``; a pair without a
    pseudo-target (:func:`target_signs`) has a NaN channel. Unpaired as the plain
    loader: each domain keeps its own subjects, and references come from the target's.
    ``bias_correction``: match the volumes N4 has freed of their bias fields;
    ``bias_field="n4"``: and keep the slices and pseudo-targets bias-free;
    ``back_translate``: domain names whose pseudo-pairs are synthetic (module docstring).
    """
    data_dir = Path(data_dir)
    index = read_index(data_dir)
    config = preprocess_config(size, min_foreground=min_foreground, bias_field=bias_field)
    unknown = set(back_translate) - {d.name for d in domains}
    if unknown or len(back_translate) >= len(domains):
        raise ConfigError(f"back_translate {sorted(back_translate)} must name some, not all, of the domains "
                          f"{', '.join(d.name for d in domains)}")
    bias_free = bias_field == "n4"
    assignment = split_unpaired(index["subjects"], domains)
    subjects = {d.name: [_Subject(data_dir, entry, d, bias_correction or bias_free, config)
                         for entry in assignment[d.name]] for d in domains}
    channels, signs = {}, {}
    for a in domains:
        sources = subjects[a.name]
        channels[a.name] = [[prepared_slices(s.flat if bias_free else s.data, s.affine, a.kind, config, axes)]
                            for s in sources]
        for b in domains:
            if b is a:
                for c in channels[a.name]:
                    c.append(c[0])
                continue
            if a.name in back_translate:
                for c in channels[a.name]:
                    c.append(np.full_like(c[0], np.nan))
                continue
            references = subjects[b.name]
            matches = [_Matches(s, references[k % len(references)]) for k, s in enumerate(sources)]
            shares = signs[f"{a.name}->{b.name}"] = choose_signs(matches)
            negate = target_signs(shares, split_vote)
            for c, pair in zip(channels[a.name], matches):
                c.append(np.full_like(c[0], np.nan) if negate is None else
                         prepared_slices(pair.pseudo_target(negate, bias_free), pair.source.affine, b.kind,
                                         config, axes))
    for k, a in enumerate(domains):
        if a.name in back_translate:
            channels[a.name] += [[c[1 + k], *c[1:]] for d in domains if d.name not in back_translate
                                 for c in channels[d.name] if np.isfinite(c[1 + k]).all()]
    out = {}
    for a in domains:
        stacks = [np.stack(c, axis=1)[kept_slices(c[0], config)] for c in channels[a.name]]
        out[a.name] = np.ascontiguousarray(np.concatenate(stacks), dtype=np.float32)
    return out, signs
