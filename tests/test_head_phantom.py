"""galip-data's head: layers around the brain, their contrast order, --no-head, determinism."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from galip.train import data_cli, head, phantom

from test_data import _files, needs_template

SPACING = 3.0  # the thinnest layers are 1.5 mm: at 3 mm enough voxels are > 80 % one tissue
CONTRASTS = ("T1w", "T2w", "PDw")


@pytest.fixture(scope="module")
def subject() -> phantom.Subject:
    return phantom.make_subject(phantom.load_anatomy(), 0, 7, SPACING, 0.02)


def _medians(subject: phantom.Subject) -> dict[str, dict[str, float]]:
    """contrast -> tissue -> median signal where that tissue fills most of a voxel (> 80 %;
    skin, 1.5-3 mm thick, > 55 %)."""
    fractions = {**subject.fractions, **{f"head {t}": f for t, f in subject.head_fractions.items()}}
    regions = {t: f > (0.55 if t == "head skin" else 0.8) for t, f in fractions.items()}
    assert all(r.sum() >= 100 for r in regions.values()), {t: int(r.sum()) for t, r in regions.items()}
    return {c: {t: float(np.median(subject.images[c][r])) for t, r in regions.items()} for c in CONTRASTS}


@needs_template
def test_head_tissues_keep_their_textbook_contrast(subject):
    m = _medians(subject)
    t1, t2 = m["T1w"], m["T2w"]
    assert t1["head fat"] > t1["WM"] > t1["GM"]            # fat is the brightest thing in a T1w
    assert t2["head CSF"] > t2["GM"] > t2["head muscle"]   # CSF rim bright, muscle dark in a T2w
    assert t2["head skin"] > t2["WM"]
    for contrast in CONTRASTS:                             # bone has no signal in any contrast
        others = [v for t, v in m[contrast].items() if t != "head skull"]
        assert m[contrast]["head skull"] < 0.6 * min(others), (contrast, m[contrast])


@needs_template
def test_head_wraps_the_brain_and_leaves_air_outside(subject):
    brain, head_mask = subject.images["mask"].astype(bool), subject.images["head"].astype(bool)
    assert (head_mask | ~brain).all()                       # the brain lies inside the head
    assert head_mask.sum() > 1.5 * brain.sum()
    assert (~head_mask).sum() > 0.2 * head_mask.size        # air around it: empty slices stay
    total = sum([*subject.fractions.values(), *subject.head_fractions.values()])
    assert total.max() <= 1.0 + 1e-5                         # layers only fill what is not brain


@needs_template
def test_no_head_is_the_brain_alone_with_the_same_brain_tissues(subject):
    bare = phantom.make_subject(phantom.load_anatomy(), 0, 7, SPACING, 0.02, head=False)
    assert bare.head_fractions == {}
    np.testing.assert_array_equal(bare.images["head"], bare.images["mask"])
    assert {t: bare.tissues[t] for t in phantom.TISSUES} == {t: subject.tissues[t] for t in phantom.TISSUES}
    assert set(subject.tissues) - set(bare.tissues) == set(head.HEAD_TISSUES)
    assert subject.tissues["skull"]["PD"] == 0.0


@needs_template
def test_head_layers_differ_between_subjects_and_repeat_for_a_seed(tmp_path):
    anatomy = phantom.load_anatomy()
    a, b = (phantom.make_subject(anatomy, i, 7, SPACING, 0.0) for i in (0, 1))
    again = phantom.make_subject(anatomy, 0, 7, SPACING, 0.0)
    for name in a.head_fractions:
        np.testing.assert_array_equal(a.head_fractions[name], again.head_fractions[name])
    assert not np.array_equal(a.head_fractions["fat"], b.head_fractions["fat"])
    runner = CliRunner()
    for name in ("x", "y"):
        result = runner.invoke(data_cli.app, ["--out", str(tmp_path / name), "--subjects", "1",
                                              "--spacing", "4", "--seed", "2"])
        assert result.exit_code == 0, result.output
    assert _files(tmp_path / "x") == _files(tmp_path / "y")
    assert (tmp_path / "x" / "sub-000" / "sub-000_head.nii.gz").is_file()


def test_thickness_fields_stay_in_each_layers_range():
    bases = [np.cos(np.pi * np.outer((np.arange(n) + 0.5) / n, np.arange(4))).astype(np.float32)
             for n in (20, 24, 18)]
    maps = head.thickness_fields(np.random.default_rng(3), bases, phantom.eval_field)
    for (_, _, lo, hi), t in zip(head.LAYERS, maps):
        assert lo <= t.min() and t.max() <= hi and t.std() > 0.02 * (hi - lo)
