"""Grad-CAM heatmaps: which region of a knee view drove the predicted grade.

Built on pytorch-grad-cam. ``find_target`` picks the layer to explain for any model klgrade
makes: a timm CNN's last feature stage (``feature_info[-1]``: ResNet ``layer4``, ConvNeXt
``stages.3``), or the last transformer block of a timm/open_clip ViT (tokens reshaped back to the
patch grid). A model it cannot explain raises :class:`ExplainError` with the reason, so callers
report "no heatmap, because ..." instead of showing a made-up map.

The CAM targets the logit of the predicted grade (the standard Grad-CAM question: "where is the
evidence for this class?"). Maps are min-max scaled per image by pytorch-grad-cam, so they show
*where*, not *how much*.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn


class ExplainError(RuntimeError):
    """A model Grad-CAM cannot be computed for; the message says why."""


def _vit_reshape(num_prefix_tokens: int, batch_first: bool = True) -> Callable:
    """Tokens (B, L, D) -> a conv-like map (B, D, h, w), dropping class/register tokens."""

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, tuple | list):
            t = t[0]
        if not batch_first:
            t = t.transpose(0, 1)
        t = t[:, num_prefix_tokens:, :]
        n = t.shape[1]
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ExplainError(f"cannot reshape {n} patch tokens to a square grid")
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def find_target(model: nn.Module) -> tuple[nn.Module, Callable | None, str]:
    """(target layer, reshape transform or None, a description) for the model's visual backbone.

    Searches the model's submodules, so a composed embedder + head model works as well as a bare
    CNN. Raises ExplainError when no supported backbone is found.
    """
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        # timm ViT (also BiomedCLIP's trunk): transformer blocks with prefix (CLS/register) tokens.
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList) and hasattr(m, "num_prefix_tokens") \
                and hasattr(m, "patch_embed") and len(blocks):
            i = len(blocks) - 1
            # norm1 of the last block: its output still depends on every patch token, unlike the
            # final norm whose gradient only flows back through the pooled CLS token.
            return (blocks[i].norm1, _vit_reshape(int(m.num_prefix_tokens)),
                    f"{prefix}blocks.{i}.norm1 (ViT tokens)")
        # open_clip's own VisionTransformer (transformer.resblocks, one class token).
        tr = getattr(m, "transformer", None)
        if hasattr(m, "class_embedding") and tr is not None and hasattr(tr, "resblocks") and len(tr.resblocks):
            i = len(tr.resblocks) - 1
            batch_first = bool(getattr(tr, "batch_first", True))
            return (tr.resblocks[i].ln_1, _vit_reshape(1, batch_first),
                    f"{prefix}transformer.resblocks.{i}.ln_1 (ViT tokens)")
        # timm CNNs: the deepest feature stage.
        info = getattr(m, "feature_info", None)
        if isinstance(info, list) and info and isinstance(info[-1], dict) and "module" in info[-1]:
            sub = info[-1]["module"]
            try:
                layer = m.get_submodule(sub)
            except AttributeError:
                continue
            return layer, None, f"{prefix}{sub}"
    raise ExplainError(f"no supported backbone found in {type(model).__name__} "
                       "(Grad-CAM needs a timm CNN or a timm/open_clip ViT)")


def gradcam(model: nn.Module, x: torch.Tensor, classes: Sequence[int],
            target: tuple[nn.Module, Callable | None, str] | None = None) -> np.ndarray:
    """Grad-CAM maps (N, H, W) float32 in [0, 1] for normalised inputs ``x`` (N, 3, H, W) and the
    grade to explain per image (usually the predicted one)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape, _ = target if target is not None else find_target(model)
    if len(classes) != len(x):
        raise ValueError(f"{len(classes)} classes for {len(x)} images")
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The graph starts at the target layer's output: Grad-CAM needs the gradient there and nothing
    # below it, so no parameter takes a gradient and the backward runs through the layers above the
    # target only (for a CNN's last stage: the pooling and the classifier), not the whole network.
    # Registered before GradCAM's own hooks, which look for an output that requires grad.
    start = layer.register_forward_hook(_graph_starts_here)
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad(), GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            maps = cam(input_tensor=x.detach(), targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        start.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32)


def _graph_starts_here(module, inputs, output):
    """Forward hook: the target layer's output as a leaf that requires grad (see ``gradcam``)."""
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output


def resize_map(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [0, 1] map to ``shape`` (to lay a model-resolution CAM on a larger view)."""
    from PIL import Image

    if cam.shape == tuple(shape):
        return cam
    im = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F")
    return np.clip(np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)), 0.0, 1.0)


def overlay(view: np.ndarray, cam: np.ndarray, image_weight: float = 0.6) -> np.ndarray:
    """RGB uint8 (H, W, 3): the gray uint8 view with the CAM as a jet colour map on top."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if view.shape != cam.shape:
        raise ValueError(f"view {view.shape} and heatmap {cam.shape} differ in size")
    rgb = np.repeat((view.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return show_cam_on_image(rgb, np.clip(cam, 0.0, 1.0), use_rgb=True, image_weight=image_weight)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode a uint8 gray (H, W) or RGB (H, W, 3) image as PNG. OpenCV's libpng encoder: a 384-px
    overlay in ~7 ms where Pillow's took ~34 (its per-row filter choice), for files ~1% larger;
    serve's page sends three a knee."""
    import cv2

    img = np.asarray(img, np.uint8)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1] if img.ndim == 3 else img))  # BGR
    if not ok:
        raise ValueError(f"cannot encode a {img.shape} image as PNG")
    return buf.tobytes()
