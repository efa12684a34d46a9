"""Explanations and dense features of timm ViTs with fused attention left on: attention maps, rollout, Grad-CAM
and prompt-patch zero-shot segmentation (spec: ../shared/methods/explain.md; docs: docs/explain.md)."""
from __future__ import annotations

from .attention import AttentionMaps, LayerAttention, attention, capture
from .maps import Explanation, explain, rollout_map
from .segment import Overlap, Segmentation, evaluate_segmentation, segment, similarity_overlap
from .region import region_weights
from .volume import VolumeSegmentation, segment_volume

__all__ = ["attention", "capture", "AttentionMaps", "LayerAttention", "explain", "Explanation", "rollout_map",
           "segment", "Segmentation", "similarity_overlap", "Overlap", "evaluate_segmentation",
           "region_weights", "segment_volume", "VolumeSegmentation"]
