"""BYOL, SimCLR and DINO around a timm backbone, with lightly's heads, losses and momentum updates.

``SSLModel(x1, x2, epoch)`` returns the loss of two views of the same images, so one DDP wrapper
around the whole module syncs the trainable parts (the momentum teacher takes no gradient and is
updated identically on every process from the synced student). :meth:`SSLModel.encoder` is the
network a pretrain run exports: the online encoder for BYOL/SimCLR, the teacher for DINO (the
DINO authors evaluate and release the teacher).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from klgrade.pretrain.config import METHODS, PretrainConfig


class SSLModel(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, cfg: PretrainConfig, distributed: bool = False):
        super().__init__()
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
        from lightly.models import utils as lu
        from lightly.models.modules import heads

        self.method, self.cfg = cfg.method, cfg
        self.backbone = backbone
        if cfg.method == "simclr":
            from lightly.loss import NTXentLoss

            self.projection = heads.SimCLRProjectionHead(dim, cfg.hidden_dim, cfg.proj_dim)
            # negatives from every process under DDP, as SimCLR intends
            self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=distributed)
            return
        if cfg.method == "byol":
            from lightly.loss import NegativeCosineSimilarity

            self.projection = heads.BYOLProjectionHead(dim, cfg.hidden_dim, cfg.proj_dim)
            self.prediction = heads.BYOLPredictionHead(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)
            self.criterion = NegativeCosineSimilarity()
        else:
            from lightly.loss import DINOLoss

            # BatchNorm in the head: the CNN variant of DINO; the last layer is frozen for epoch 1
            def dino_head():
                with warnings.catch_warnings():  # lightly still uses the old torch weight_norm
                    warnings.simplefilter("ignore", FutureWarning)
                    return heads.DINOProjectionHead(dim, cfg.hidden_dim, cfg.proj_dim, cfg.dino_out_dim,
                                                    batch_norm=True, freeze_last_layer=1)

            self.projection = dino_head()
            # weight_norm's computed weight cannot be deep-copied: build the teacher head, copy state
            self.projection_m = dino_head()
            self.projection_m.load_state_dict(self.projection.state_dict())
            self.criterion = DINOLoss(output_dim=cfg.dino_out_dim, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                      warmup_teacher_temp_epochs=max(1, cfg.epochs // 3))
        self.backbone_m = copy.deepcopy(backbone)
        if not hasattr(self, "projection_m"):
            self.projection_m = copy.deepcopy(self.projection)
        lu.deactivate_requires_grad(self.backbone_m)
        lu.deactivate_requires_grad(self.projection_m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        if self.method == "simclr":
            z1, z2 = self.projection(self.backbone(x1)), self.projection(self.backbone(x2))
            return self.criterion(z1.float(), z2.float())
        with torch.no_grad():
            t1 = self.projection_m(self.backbone_m(x1)).float()
            t2 = self.projection_m(self.backbone_m(x2)).float()
        s1, s2 = self.projection(self.backbone(x1)), self.projection(self.backbone(x2))
        if self.method == "byol":
            p1, p2 = self.prediction(s1).float(), self.prediction(s2).float()
            return 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1))
        return self.criterion([t1, t2], [s1.float(), s2.float()], epoch=epoch)

    def after_backward(self, epoch: int) -> None:
        if self.method == "dino":
            self.projection.cancel_last_layer_gradients(current_epoch=epoch)

    @torch.no_grad()
    def update_teacher(self, step: int, total_steps: int) -> None:
        """EMA of the student, momentum rising from cfg.momentum to 1 on a cosine (BYOL, DINO)."""
        if self.method == "simclr":
            return
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(min(step, total_steps), max(1, total_steps), self.cfg.momentum, 1.0)
        update_momentum(self.backbone, self.backbone_m, m)
        update_momentum(self.projection, self.projection_m, m)

    def encoder(self) -> nn.Module:
        return self.backbone_m if self.method == "dino" else self.backbone
