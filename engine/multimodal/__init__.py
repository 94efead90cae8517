"""Multimodal inputs: items carried by a request, image preprocessing, the encoder-output cache."""
from engine.multimodal.items import MRopePositions, MultiModalItem, StepMultiModal

__all__ = ["MRopePositions", "MultiModalItem", "StepMultiModal"]
