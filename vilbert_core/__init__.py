"""ViLBERT model, training and evaluation.

Public model API (see docs/model.md):
    from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks, init_text_from_bert
"""

from .checkpoint import LoadReport, init_text_from_bert
from .config import ViLBERTConfig
from .modeling import (
    ViLBERTForPretraining,
    ViLBERTForTasks,
    ViLBERTModel,
    ViLBERTModelOutput,
    ViLBERTPretrainingOutput,
    ViLBERTTaskOutput,
)

__all__ = [
    "LoadReport",
    "ViLBERTConfig",
    "ViLBERTForPretraining",
    "ViLBERTForTasks",
    "ViLBERTModel",
    "ViLBERTModelOutput",
    "ViLBERTPretrainingOutput",
    "ViLBERTTaskOutput",
    "init_text_from_bert",
]
