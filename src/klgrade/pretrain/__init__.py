"""Self-supervised pretraining on unlabelled knee radiographs (``klgrade pretrain``); see docs/pretrain.md.

A pretrain run dir is a backbone everywhere: :func:`load_pretrain_backbone` is the one loader
behind ``klgrade train --weights RUN``, ``klgrade embed --backbone RUN`` and ``pretrain --init RUN``.
"""
from klgrade.models.pretrain_weights import PretrainBackbone, is_pretrain_run, load_pretrain_backbone

__all__ = ["PretrainBackbone", "is_pretrain_run", "load_pretrain_backbone"]
