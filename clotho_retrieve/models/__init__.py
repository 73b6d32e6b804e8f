"""The paper's model: PANNs backbone -> attention (none | self | gat) -> mean pooling x BERT [CLS]."""

from clotho_retrieve.models.backbones import BACKBONES, build_backbone, load_panns_checkpoint
from clotho_retrieve.models.retrieval import ModelConfig, RetrievalModel

__all__ = ["BACKBONES", "ModelConfig", "RetrievalModel", "build_backbone", "load_panns_checkpoint"]
