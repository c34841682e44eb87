"""Pretraining on captions: masked language and region modelling plus caption-image alignment.

Training masks every batch (`vilbert_core.training.masking`: 15% of tokens 80/10/10, 15% of regions
90% zeroed); misaligned pairs carry no MLM / MRM loss, and those heads run only on the positions that
carry one. Evaluation masks the same way from a seeded generator and reports masked-token accuracy,
perplexity, masked-region KL and alignment accuracy beside the alignment accuracy of chance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vilbert_core.evaluation.common import record_count, task_batches
from vilbert_core.evaluation.loading import EvalError
from vilbert_core.evaluation.metrics import (
    alignment_stats,
    masked_region_kl_stats,
    masked_token_stats,
    pretrain_summary,
)
from vilbert_core.tasks import EvalOptions, Task, TaskDefaults, model_inputs
from vilbert_core.training.losses import pretraining_losses, pretraining_positions
from vilbert_core.training.masking import IGNORE_INDEX, MaskingSpec, mask_batch

# A pretraining model whose alignment accuracy stays below the label majority plus this has not learnt
# to tell matching captions from others.
ALIGNMENT_MARGIN = 5.0


def masked_forward(
    model: nn.Module, batch: dict[str, Any], masking: MaskingSpec, aligned: torch.Tensor
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask a batch and run the model with its MLM / MRM heads on the scored positions only.

    Returns (output, MLM labels, region labels, scored tokens (B,T), scored regions (B,R)): the masked
    tokens and regions of the aligned pairs.
    """
    input_ids, mlm_labels, image_feat, region_labels = mask_batch(batch, masking)
    tokens, regions = pretraining_positions(mlm_labels, region_labels, aligned)
    inputs = {**model_inputs(batch), "input_ids": input_ids, "image_feat": image_feat}
    out = model(**inputs, mlm_positions=tokens, mrm_positions=regions)
    return out, mlm_labels, region_labels, tokens, regions


class PretrainTask(Task):
    """MLM + MRM + alignment on caption shards."""

    name = "pretrain"
    shard_task = "captions"
    model_kind = "pretraining"
    eval_kinds = ("pretraining",)
    heads = "the MLM, MRM and alignment heads"
    defaults = TaskDefaults(batch_size=512, lr=1e-4, epochs=10, metric="align_acc")
    explain_head = "align"
    writes_predictions = False

    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """mlm, mrm and align losses and their sum ("loss")."""
        if masking is None:
            raise ValueError("pretraining needs a MaskingSpec (mask token id, vocab size, special ids)")
        out, mlm_labels, region_labels, _, _ = masked_forward(model, batch, masking, batch["align_label"])
        return pretraining_losses(out, mlm_labels, region_labels, batch["image_target"], batch["align_label"])

    @torch.no_grad()
    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Alignment accuracy; no token or region goes through the MLM / MRM heads."""
        no_tokens = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        no_regions = torch.zeros_like(batch["image_mask"], dtype=torch.bool)
        out = model(**model_inputs(batch), mlm_positions=no_tokens, mrm_positions=no_regions)
        return ((out.align_logit > 0).float() == batch["align_label"].float()).float()

    @torch.inference_mode()
    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, None]:
        """Masked-token accuracy and perplexity, masked-region KL and alignment accuracy on held-out captions.

        Masking follows training from a generator seeded with `options.seed`; as in training,
        misaligned pairs are not scored for MLM and MRM.
        """
        # A CPU generator on every device, as in training: the masks, so the metrics, do not depend on the
        # device (a CUDA generator draws other numbers from the same seed).
        masking = MaskingSpec.for_tokenizer(loaded.tokenizer, torch.Generator().manual_seed(options.seed))
        sums_tok = {"correct": 0, "nll": 0.0, "count": 0}
        sums_reg = {"kl": 0.0, "count": 0}
        sums_al = {"correct": 0, "count": 0}
        positives = 0
        bar = tqdm(total=record_count(info), desc="pretrain", unit="pair", disable=not options.progress)
        batches = task_batches(loaded, data_dir, "captions", options.batch_size, options.seed, options.num_workers)
        for batch in batches:
            classes = loaded.model.config.v_target_size
            if classes != batch["image_target"].shape[-1]:
                raise EvalError(
                    f"the model predicts {classes} region classes but the shards' detector "
                    f"distributions have {batch['image_target'].shape[-1]}"
                )
            aligned = batch["align_label"] > 0.5  # (B,)
            out, mlm_labels, region_labels, tokens, regions = masked_forward(loaded.model, batch, masking, aligned)
            for total, part in (
                (sums_tok, masked_token_stats(out.mlm_logits, mlm_labels[tokens], IGNORE_INDEX)),
                (sums_reg, masked_region_kl_stats(out.mrm_logits, batch["image_target"][regions], regions[regions])),
                (sums_al, alignment_stats(out.align_logit, batch["align_label"])),
            ):  # fmt: skip
                for k, v in part.items():
                    total[k] += v
            positives += int(aligned.sum())
            bar.update(len(batch["image_id"]))
        bar.close()
        if sums_al["count"] == 0:
            raise EvalError(f"--data {data_dir}: no captions")
        metrics: dict[str, Any] = pretrain_summary(sums_tok, sums_reg, sums_al)
        # a blind model's best alignment accuracy: always the more frequent label
        chance = 100.0 * max(positives, sums_al["count"] - positives) / sums_al["count"]
        metrics["baselines"] = {"chance": {"alignment_accuracy": chance}}
        metrics["warnings"] = []
        if metrics["alignment_accuracy"] < chance + ALIGNMENT_MARGIN:
            metrics["warnings"].append(
                f"alignment accuracy {metrics['alignment_accuracy']:.2f} is within {ALIGNMENT_MARGIN:.0f} points "
                f"of chance ({chance:.2f}): the model does not tell a matching caption from another image's"
            )
        return metrics, None


TASK = PretrainTask()
