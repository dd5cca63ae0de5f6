"""Knee geometry shared by the knee locator (klgrade.ingest.roi, used by ingest and the view) and
the model's view (klgrade.view.canonical): one calibration, so ingest and view agree on what a knee is."""
from __future__ import annotations

# Adult tibial plateau width (mm): sets the view's field of view when the pixel spacing is known,
# and estimates an unknown spacing from a located joint's width in px.
TYPICAL_KNEE_WIDTH_MM = 76.0
# Plausible medial-lateral width of a located joint line (mm); outside it, spacing or location is wrong.
KNEE_WIDTH_MM = (45.0, 130.0)
