"""The backbone's own ImageNet-1k classifier as a ready-made multi-class head named `imagenet`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer.backbones import Backbone
from indexer.heads.model import MULTICLASS, Head
from indexer.heads.storage import save_head
from indexer.models import HeadRow

IMAGENET_HEAD = "imagenet"
# Tag the top class always, and any other class the model gives at least this probability.
IMAGENET_SCORE_FLOOR = 0.2


def ensure_builtin_heads(session: Session, backbone: Backbone, backbone_id: int) -> None:
    """Create the `imagenet` head once, for backbones that ship a classifier (not CLIP)."""
    if backbone.classifier is None:
        return
    if session.scalar(select(HeadRow.id).where(HeadRow.name == IMAGENET_HEAD)) is not None:
        return
    classifier = backbone.classifier
    head = Head(
        IMAGENET_HEAD,
        MULTICLASS,
        list(classifier.labels),
        classifier.weight,
        classifier.bias,
        min_confidence=0.0,
        score_floor=IMAGENET_SCORE_FLOOR,
    )
    metrics = {"source": f"{backbone.name} ImageNet-1k classifier (pretrained, not trained by lookalike)"}
    save_head(session, head, backbone_id, metrics=metrics, builtin=True, scale_by_norm=True)
