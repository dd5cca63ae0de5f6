"""Grey-level polarity of image files that do not state it (PNG, JPEG, TIFF).

A DICOM says whether bone is bright (MONOCHROME2) or dark (MONOCHROME1) and its reader acts on it.
A PNG says nothing, and exports of MONOCHROME1 films keep bone dark: 84 of the 6,604 kneeKL224
crops (1.3%; 14 of its 826 val knees) are stored so. Everything downstream (the joint locator,
the models, the JSW measurement) expects bone bright, so such a file is read inverted.

The cue is the knee's own layout: the bones fill the middle of a knee image and soft tissue (or air)
its left and right edges, so in a bone-bright image the middle is brighter than the edges.
On kneeKL224 that contrast is >= +0.066 for every upright crop and <= -0.073 for every inverted
one; only a file darker in the middle by more than ``MARGIN`` is inverted. Edge columns that are
nearly uniform top to bottom (a collimator's blank band, a padded border, flat air) say nothing
of the anatomy: the strips are the outermost textured columns within ``SEARCH`` of each edge. An upright two-leg film (klgrade.ingest.roi.is_bilateral: a dark gap
between two bright legs, which darkens its middle) is left as stored. Not detected, so left as
stored: an inverted two-leg film (the layout test on the inverted film also passes some upright
wide crops of one knee, 1 in 500 kneeKL224 crops re-rendered 1.85:1), and a frame filled with bone
(a crop much tighter than the joint has no soft-tissue edge; 73 of the 84 inverted kneeKL224 crops
zoomed in 30% are still caught).
"""
from __future__ import annotations

import numpy as np

NOTE = "grey levels stored inverted (bone dark, no polarity stated): read inverted"
MARGIN = 0.03  # middle darker than the edges by more than this (of the [0, 1] range) = inverted
MIDDLE = (0.3, 0.7)  # rows and columns of the middle box (fractions of the height / width)
EDGE = 0.08  # width of each edge strip (fraction of the width) ...
SEARCH = 0.3  # ... its textured columns taken outermost first within this share of the width
SAMPLE_PX = 512  # larger images are decided on every n-th pixel (this many along the longer side)
FLAT_STD = 0.01  # an edge column varying less than this top to bottom is a blank band, not tissue


def edge_contrast(img: np.ndarray) -> float:
    """Mean of the middle box minus the mean of the outermost textured columns on each side (nan
    when the outer columns are all blank)."""
    h, w = img.shape
    a, b = int(MIDDLE[0] * h), max(int(MIDDLE[1] * h), int(MIDDLE[0] * h) + 1)
    c, d = int(MIDDLE[0] * w), max(int(MIDDLE[1] * w), int(MIDDLE[0] * w) + 1)
    k, reach = max(1, int(EDGE * w)), max(1, int(SEARCH * w))
    textured = img.std(axis=0) >= FLAT_STD
    left = np.flatnonzero(textured[:reach])[:k]
    right = w - reach + np.flatnonzero(textured[w - reach:])[::-1][:k]
    cols = np.concatenate([left, right])
    if cols.size == 0:
        return float("nan")
    return float(img[a:b, c:d].mean() - img[:, cols].mean())


def stored_inverted(img: np.ndarray) -> bool:
    """Whether a 2-D float [0, 1] knee image without a stated polarity has bone dark."""
    from klgrade.ingest.roi import is_bilateral

    h, w = img.shape
    step = max(1, max(h, w) // SAMPLE_PX)  # a film's statistics need no more pixels than this
    contrast = edge_contrast(img[::step, ::step])
    if not (np.isfinite(contrast) and contrast < -MARGIN):
        return False
    # a darker middle is also the gap between an upright two-leg film's legs (asked only here:
    # the view asks it again of every film)
    return not (w >= 1.1 * h and min(h, w) >= 64 and is_bilateral(img))
