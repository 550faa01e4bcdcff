"""Training-free baselines a translation has to beat (docs/design.md, "How quality is judged").

Each baseline turns a source volume into a guess of the target contrast with no training:

* ``identity``: the source itself;
* ``histogram match``: the source matched (``skimage.exposure.match_histograms``) to ANOTHER
  subject's target-contrast volume (the source's own target would leak the answer);
* ``histogram match (negated)``: the same for ``-source``; on 3-tissue phantoms it already
  inverts T1 into a plausible T2 (about 25 dB / 0.93 inside the brain).

Matching runs inside a region, the brain mask that the scores are taken in (so the
baseline is as strong as it can be where it is judged: docs/design.md's T1→T2 about 25 dB / 0.93),
between the source's region and the reference subject's, and leaves everything else at 0.
Matched over whole volumes instead, the negated source's background (its brightest values)
would take the reference's tissue intensities.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Baseline = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(source, reference target, source region, reference region) -> guess of the target, float32"""


def match_region(source: np.ndarray, reference: np.ndarray, region: np.ndarray,
                 reference_region: np.ndarray) -> np.ndarray:
    """``source`` inside ``region`` histogram-matched to ``reference`` inside
    ``reference_region`` (bool masks); 0 elsewhere. Float32 of ``source``'s shape."""
    from skimage.exposure import match_histograms
    out = np.zeros(np.shape(source), np.float32)
    if region.any() and reference_region.any():
        out[region] = match_histograms(np.asarray(source, np.float32)[region],
                                       np.asarray(reference, np.float32)[reference_region])
    return out


def identity(source: np.ndarray, reference: np.ndarray, region: np.ndarray,
             reference_region: np.ndarray) -> np.ndarray:
    """The source as the output (everything else unused)."""
    return np.asarray(source, np.float32).copy()


def histogram_match(source: np.ndarray, reference: np.ndarray, region: np.ndarray,
                    reference_region: np.ndarray) -> np.ndarray:
    """The source histogram-matched to another subject's target contrast (:func:`match_region`)."""
    return match_region(source, reference, region, reference_region)


def negated_histogram_match(source: np.ndarray, reference: np.ndarray, region: np.ndarray,
                            reference_region: np.ndarray) -> np.ndarray:
    """``-source`` histogram-matched the same way: a contrast inversion at no cost."""
    return match_region(-np.asarray(source, np.float32), reference, region, reference_region)


#: name (as in the JSON and the table) -> baseline
BASELINES: dict[str, Baseline] = {
    "identity": identity,
    "histogram match": histogram_match,
    "histogram match (negated)": negated_histogram_match,
}
