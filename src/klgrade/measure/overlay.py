"""Draw a JSW measurement on the knee's view: condyle margin, plateau margin and the minimum.

Lines are measured in input-image pixels; :func:`to_view` maps them onto a canonical view made
with the same ``ViewInfo`` (same centre and field of view, mirrored for a left knee of a bilateral
film), so the lines land on the crop a reader sees. Colours: femoral margin cyan, tibial margin
yellow, minimum JSW red.
"""
from __future__ import annotations

import numpy as np

FEMUR_RGB = (0, 220, 255)
TIBIA_RGB = (255, 220, 0)
MIN_RGB = (255, 40, 40)


def to_view(points, info, size: int) -> np.ndarray:
    """(N, 2) input-image (x, y) -> pixel coordinates of a ``size`` canonical view made with ``info``."""
    from klgrade.view.canonical import JOINT_ROW

    p = np.asarray(points, np.float64).reshape(-1, 2)
    s = size / info.fov_px
    dx = p[:, 0] - info.centre[0]
    if info.flipped:
        dx = -dx
    x = (dx + 0.5 * info.fov_px + 0.5) * s - 0.5
    y = (p[:, 1] - info.centre[1] + JOINT_ROW * info.fov_px + 0.5) * s - 0.5
    return np.stack([x, y], axis=1)


def draw(view: np.ndarray, jsw, info) -> np.ndarray:
    """RGB uint8 copy of ``view`` (gray or RGB uint8, a canonical view made with ``info``) with
    the measured margins and each compartment's minimum drawn on it."""
    import cv2

    img = np.ascontiguousarray(view if view.ndim == 3 else np.repeat(view[..., None], 3, axis=2))
    size = img.shape[0]
    th = max(1, size // 256)
    for c in (jsw.medial, jsw.lateral):
        for pts, rgb in ((c.femur, FEMUR_RGB), (c.tibia, TIBIA_RGB)):
            if len(pts) >= 2:
                q = np.round(to_view(pts, info, size)).astype(np.int32)
                cv2.polylines(img, [q], False, rgb, th, cv2.LINE_AA)
        if c.at:
            (x0, y0), (x1, y1) = np.round(to_view(c.at, info, size)).astype(int)
            tick = 2 * th + 1
            cv2.line(img, (x0, y0), (x1, y1), MIN_RGB, th, cv2.LINE_AA)
            for y in (y0, y1):
                cv2.line(img, (x0 - tick, y), (x0 + tick, y), MIN_RGB, th, cv2.LINE_AA)
    return img


def label(jsw) -> str:
    """Short caption: 'M 3.1 L 5.6 mm', 'M 0 (bone on bone) ...', 'not measured'."""
    if not (jsw.medial.ok or jsw.lateral.ok):
        return "JSW not measured"
    unit = "mm" if jsw.unit == "mm" else "%W"

    def one(c):
        if not c.ok:
            return "-"
        return "0 BoB" if c.flag == "bone_on_bone" else f"{c.min:.1f}"

    return f"M {one(jsw.medial)} L {one(jsw.lateral)} {unit}"


def caption(jsw: dict) -> str:
    """'medial 3.12 mm, lateral 5.60 mm' from a JSW's ``as_dict`` (0 with '(bone on bone)' for a
    collapsed compartment; 'not measured', and the reason when neither was)."""
    unit = "mm" if jsw["unit"] == "mm" else "% of plateau width"
    parts = []
    for name in ("medial", "lateral"):
        c = jsw[name]
        v = "not measured" if c["min"] is None else f"{c['min']:.2f} {unit}"
        parts.append(f"{name} {v}" + (" (bone on bone)" if c["flag"] == "bone_on_bone" else ""))
    return ", ".join(parts) + (f"  ({jsw['reason']})" if jsw.get("reason") and not jsw["ok"] else "")


def contact_sheet(tiles: list[np.ndarray], captions: list[str], path, cols: int = 6) -> None:
    """A grid of RGB tiles (same size) with a caption under each, written atomically as PNG."""
    from PIL import Image, ImageDraw

    from klgrade import io

    if not tiles:
        return
    t = tiles[0].shape[0]
    rows = int(np.ceil(len(tiles) / cols))
    sheet = Image.new("RGB", (cols * t, rows * (t + 14)), (0, 0, 0))
    pen = ImageDraw.Draw(sheet)
    for k, (tile, cap) in enumerate(zip(tiles, captions)):
        x, y = (k % cols) * t, (k // cols) * (t + 14)
        sheet.paste(Image.fromarray(tile), (x, y))
        pen.text((x + 3, y + t + 1), cap, fill=(255, 255, 255))
    with io.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
