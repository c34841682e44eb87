"""The reference implementation (facebookresearch/vilbert-multi-task) beside ours, for bench_model.py and
bench_eval.py `--compare-reference PATH`.

PATH is a checkout of the reference code; it is imported from there and never copied into this
repository. Only its public API is used: `vilbert.vilbert.BertConfig.from_dict`,
`BertForMultiModalPreTraining(config)` and its forward with masked_lm_labels / image_label /
image_target / next_sentence_label (returns the three losses), and
`VILBertForVLTasks(config, num_labels, default_gpu=False)`, whose forward takes (input_txt, input_imgs,
image_loc, token_type_ids, attention_mask, image_attention_mask) and returns a tuple of heads.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vilbert_core.config import REFERENCE_DEFAULTS, ViLBERTConfig

# the reference's ignore label for masked-token and masked-region labels (ours is -100)
REFERENCE_IGNORE = -1


def load_reference(path: str | Path) -> ModuleType:
    """The reference's `vilbert.vilbert` module, imported from a checkout at path."""
    root = Path(path).resolve()
    if not (root / "vilbert" / "vilbert.py").is_file():
        raise SystemExit(
            f"--compare-reference {path}: no vilbert/vilbert.py there; pass the root of a vilbert-multi-task checkout"
        )
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("vilbert.vilbert")
    except ImportError as err:
        raise SystemExit(f"--compare-reference {path}: the reference code does not import here: {err}") from None


def reference_config(module: ModuleType, cfg: ViLBERTConfig) -> Any:
    """The reference's BertConfig with our configuration's sizes (so both build the same architecture)."""
    values = {k: getattr(cfg, k) for k in REFERENCE_DEFAULTS}
    # the reference's pretraining model reads these; KL against the detector's distribution, no task tokens
    values |= {"vocab_size": cfg.vocab_size, "visual_target": 0, "predict_feature": False,
               "task_specific_tokens": False}  # fmt: skip
    return module.BertConfig.from_dict(values)


def reference_pretraining_inputs(
    inputs: dict[str, torch.Tensor],
    mlm_labels: torch.Tensor,
    region_labels: torch.Tensor,
    image_target: torch.Tensor,
    align_label: torch.Tensor,
) -> dict[str, Any]:
    """Our masked pretraining batch in the reference's forward arguments and label conventions.

    inputs: the six model inputs after masking; labels as our masking functions return them. The
    reference predicts regions 1.. (not the global region 0), takes -1 as its ignore label and 0 as
    "aligned" in next_sentence_label.
    """
    return {
        "input_ids": inputs["input_ids"],
        "image_feat": inputs["image_feat"],
        "image_loc": inputs["image_loc"],
        "token_type_ids": inputs["token_type_ids"],
        "attention_mask": inputs["attention_mask"],
        "image_attention_mask": inputs["image_mask"],
        "masked_lm_labels": mlm_labels.masked_fill(mlm_labels < 0, REFERENCE_IGNORE),
        "image_label": region_labels[:, 1:].masked_fill(region_labels[:, 1:] < 0, REFERENCE_IGNORE),
        "image_target": image_target[:, 1:],
        "next_sentence_label": (1 - align_label).long(),
    }
