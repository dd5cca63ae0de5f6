"""Synthetic knee radiographs: the built-in data of the demo and the tests.

The model is a projection radiograph drawn from implicit shapes in millimetres: soft-tissue
envelope, femur with medial/lateral condyles and intercondylar notch, tibia with plateau and
spines, fibular head (lateral), faint patella, trabecular texture and cortical rims. Kellgren-
Lawrence findings are a deterministic function of the grade and a few per-knee "phenotype"
quantiles (so one knee looks consistent across visits), plus small per-image jitter:

* KL1: doubtful tiny osteophytic lipping at one or two margins (overlaps KL0 on purpose);
* KL2: definite osteophytes, possible slight medial narrowing, peaked tibial spines;
* KL3: multiple moderate osteophytes, definite narrowing, some subchondral sclerosis;
* KL4: large osteophytes, marked narrowing, severe sclerosis, varus tilt and plateau attrition.

Canonical orientation (``render_knee``): a RIGHT knee as seen on a PA radiograph, i.e. the lateral
side (fibula) on the image's left; left knees are its mirror image. ``render_bilateral`` puts the
patient's right knee on the image's left, as on OAI bilateral PA fixed-flexion films.

The code lives in three modules, re-exported here (import from this module):
:mod:`klgrade.synthetic.anatomy` (cohort, anatomy, findings, true JSW, drawing one knee),
:mod:`klgrade.synthetic.film` (exposure, rendering, DICOM datasets) and
:mod:`klgrade.synthetic.write` (PNG datasets, OAI-shaped DICOM trees, truth and label tables).
"""
from __future__ import annotations

from klgrade.grades import GRADES
from klgrade.synthetic.anatomy import (
    ANATOMY_KEYS,
    BASELINE_PREVALENCE,
    DEFAULT_VISITS,
    JSW_RANGE_MM,
    LABEL_FEATURES,
    VISIT_CODES,
    knee_findings,
    make_cohort,
    oarsi_grades,
    random_anatomy,
    random_patient,
    true_jsw,
)
from klgrade.synthetic.film import (
    CR_SOP_CLASS,
    DX_SOP_CLASS,
    KNEE_SERIES,
    OTHER_SERIES,
    bilateral_dataset,
    render_bilateral,
    render_knee,
    save_dataset,
    to_stored,
)
from klgrade.synthetic.write import (
    FILM_WIDTH_MM,
    film_spacing_range,
    write_dicom_tree,
    write_png_dataset,
)

__all__ = [
    "ANATOMY_KEYS", "BASELINE_PREVALENCE", "CR_SOP_CLASS", "DEFAULT_VISITS", "DX_SOP_CLASS",
    "FILM_WIDTH_MM", "GRADES", "JSW_RANGE_MM", "KNEE_SERIES", "LABEL_FEATURES", "OTHER_SERIES",
    "VISIT_CODES", "bilateral_dataset", "film_spacing_range", "knee_findings", "make_cohort",
    "oarsi_grades", "random_anatomy", "random_patient", "render_bilateral", "render_knee",
    "save_dataset", "to_stored", "true_jsw", "write_dicom_tree", "write_png_dataset",
]
