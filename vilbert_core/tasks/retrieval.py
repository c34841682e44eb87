"""Image-text retrieval: the pair head (or, zero-shot, a pretraining model's alignment head) ranks pairs.

Training: cross-entropy over the positive and its 3 negatives; validation: the positive ranked first.
Evaluation: image and text retrieval R@1/5/10 over every (image, caption) pair of the split and under
the 100-candidate protocol, beside the exact chance level; what depends on one side only is computed
once (`score_all_pairs`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vilbert_core.evaluation.baselines import retrieval_chance
from vilbert_core.evaluation.common import file_safe, fmt
from vilbert_core.evaluation.loading import EvalError, LoadedModel
from vilbert_core.evaluation.metrics import RECALL_KS, recall_at_k, retrieval_ranks
from vilbert_core.tasks import IMAGE_KEYS, TEXT_KEYS, EvalOptions, Task, TaskDefaults, candidate_logits
from vilbert_core.training.losses import multiple_choice_loss


def read_retrieval_set(
    loaded: LoadedModel, data_dir: Path, max_images: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """All images (padded regions) and all captions (padded tokens) of retrieval task shards.

    max_images: keep only the first N images in shard order (and their captions), for quick checks.

    Returns (image tensors {image_feat (N,R,D), image_loc (N,R,5), image_mask (N,R)},
    text tensors {input_ids, token_type_ids, attention_mask (M,T)}, caption -> image index (M,), image ids).
    """
    import webdataset as wds

    from pipelines.datasets import build_regions, collate, expand_urls
    from pipelines.shard_job import iter_tar_samples

    urls, _ = expand_urls(str(data_dir))
    examples: list[dict] = []
    texts: list[str] = []
    caption_image: list[int] = []
    for url in urls:
        if max_images is not None and len(examples) >= max_images:
            break
        with wds.gopen(url, "rb") as stream:
            for key, sample in iter_tar_samples(stream, url):
                if max_images is not None and len(examples) >= max_images:
                    break
                records = json.loads(sample["ann.json"])
                regions = build_regions(sample, loaded.max_regions)
                if regions.feat.shape[1] != loaded.feature_dim:
                    raise EvalError(
                        f"{url}: sample {key} has {regions.feat.shape[1]}-d features, the model expects "
                        f"{loaded.feature_dim}-d"
                    )
                for r in records:
                    texts.append(r["caption"])
                    caption_image.append(len(examples))
                examples.append(
                    {
                        "task": "retrieval",
                        "image_id": key,
                        "texts": [([0], [0])],
                        "regions": [regions],
                        "label": 0,
                    }
                )
    if not examples or not texts:
        raise EvalError(f"--data {data_dir}: no images or no captions")
    # collate pads the regions; the dummy text of each image is dropped
    img_batch = collate(examples)
    images = {k: img_batch[k] for k in ("image_feat", "image_loc", "image_mask")}
    encoded = loaded.tokenizer.encode_batch(texts)
    t = max(len(ids) for ids, _ in encoded)
    text = {k: torch.zeros(len(encoded), t, dtype=torch.long) for k in TEXT_KEYS}
    text["input_ids"].fill_(loaded.tokenizer.pad_id)
    for i, (ids, seg) in enumerate(encoded):
        text["input_ids"][i, : len(ids)] = torch.tensor(ids)
        text["token_type_ids"][i, : len(seg)] = torch.tensor(seg)
        text["attention_mask"][i, : len(ids)] = 1
    return images, text, torch.tensor(caption_image), [e["image_id"] for e in examples]


@torch.inference_mode()
def score_all_pairs(
    loaded: LoadedModel,
    images: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    batch_size: int,
    progress: bool = True,
    caption_chunk: int = 1024,
) -> torch.Tensor:
    """Score every (image, caption) pair -> (N_img, N_cap) on the CPU, in batches of pairs.

    Fine-tuned models score with the pair head; pretraining models (zero-shot) with the alignment head.
    What depends on one side only is computed once: each image's region embedding and visual layers
    before co-attention (`embed_image`), each caption's text layers before co-attention (`embed_text`,
    `caption_chunk` captions at a time to bound memory); each pair then runs only the co-attention part
    (`score_pairs`). The scores equal the full forward pass's to float rounding (tested).
    The cost grows as images x captions, so the progress bar counts pairs and shows the ETA.
    """
    n_img, n_cap = images["image_feat"].shape[0], text["input_ids"].shape[0]
    scores = torch.empty(n_img, n_cap, dtype=torch.float32)
    dev, model = loaded.device, loaded.model
    image_mask = images["image_mask"].to(dev)
    region_counts = image_mask.sum(1)
    # (N_img, R, v_hidden): once per image
    image_states = torch.cat(
        [
            model.vilbert.embed_image(*(images[k][i : i + batch_size].to(dev) for k in IMAGE_KEYS))
            for i in range(0, n_img, batch_size)
        ]
    )
    with tqdm(total=n_img * n_cap, desc=f"retrieval {n_img}x{n_cap}", unit="pair", disable=not progress) as bar:
        for c0 in range(0, n_cap, caption_chunk):
            chunk = {k: v[c0 : c0 + caption_chunk].to(dev) for k, v in text.items()}
            n = chunk["input_ids"].shape[0]
            # (n, T, hidden): once per caption
            text_states = torch.cat(
                [
                    model.vilbert.embed_text(*(chunk[k][i : i + batch_size] for k in TEXT_KEYS))
                    for i in range(0, n, batch_size)
                ]
            )
            token_counts = chunk["attention_mask"].sum(1)
            for start in range(0, n_img * n, batch_size):
                pair = torch.arange(start, min(start + batch_size, n_img * n), device=dev)
                img, cap = pair // n, pair % n  # image-major within the chunk
                # trim padding shared by the whole batch: fewer tokens and regions, same scores
                t, r = int(token_counts[cap].max()), int(region_counts[img].max())
                masks = [chunk["attention_mask"][cap, :t], image_mask[img, :r]]
                # no padding left: the model may use its fastest unmasked attention
                masks = [None if bool(m.all()) else m for m in masks]
                logits = model.score_pairs(text_states[cap, :t], image_states[img, :r], *masks)
                scores[img.cpu(), (c0 + cap).cpu()] = logits.float().cpu()
                bar.update(pair.numel())
    return scores


class RetrievalTask(Task):
    """Caption-image matching."""

    name = "retrieval"
    shard_task = "retrieval"
    eval_kinds = ("tasks", "pretraining")  # a pretraining model is scored zero-shot
    heads = "a pair head"
    defaults = TaskDefaults(batch_size=64, lr=2e-5, epochs=20, metric="accuracy")
    writes_predictions = False

    def loss(self, model: nn.Module, batch: dict[str, Any], masking: Any = None) -> dict[str, torch.Tensor]:
        """Cross-entropy over the 4 candidates' pair logits."""
        return {"loss": multiple_choice_loss(candidate_logits(model, batch, shared_image=False), batch["label"])}

    @torch.no_grad()
    def validation_score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """1 where the positive candidate has the highest pair logit."""
        return (candidate_logits(model, batch, shared_image=False).argmax(-1) == batch["label"]).float()

    def evaluate(
        self, loaded: Any, data_dir: Path, info: dict, options: EvalOptions, setup: Any
    ) -> tuple[dict, Any]:
        """Image and text retrieval R@1/5/10 over the full set and under the 100-candidate protocol."""
        images, text, caption_image, image_ids = read_retrieval_set(loaded, data_dir, options.max_images)
        t0 = time.perf_counter()
        scores = score_all_pairs(loaded, images, text, options.batch_size, options.progress)
        seconds = time.perf_counter() - t0
        ranks = retrieval_ranks(scores, caption_image, options.num_candidates, options.seed)
        metrics: dict[str, Any] = {name: recall_at_k(r) for name, r in ranks.items()}
        metrics.update(
            {
                "num_images": len(image_ids),
                "num_captions": int(caption_image.numel()),
                "zero_shot": loaded.kind == "pretraining",
                "scoring_seconds": round(seconds, 3),
                "pairs_per_second": round(scores.numel() / max(seconds, 1e-9), 1),
                "candidate_seed": options.seed,
                "max_images": options.max_images,
                "baselines": {"chance": retrieval_chance(caption_image, len(image_ids), options.num_candidates)},
            }
        )
        return metrics, {"ranks": ranks, "image_ids": image_ids}

    def report(self, metrics: dict) -> tuple[list[str], dict[str, dict]]:
        """One table: R@K per protocol, with the chance R@1."""
        groups = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        recalls = {k: v for k, v in groups.items() if k != "baselines"}
        chance = (groups.get("baselines") or {}).get("chance", {})
        lines: list[str] = []
        if recalls:
            head = "| protocol | " + " | ".join(f"R@{k}" for k in RECALL_KS)
            lines += [head + (" | chance R@1 |" if chance else " |"), "|---" * (len(RECALL_KS) + 1 + bool(chance)) + "|"]
            for name, rec in recalls.items():
                cells = [fmt(rec[f"r{k}"]) for k in RECALL_KS] + ([fmt(chance[name]["r1"])] if name in chance else [])
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        return lines, {}

    def plots(self, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
        """Recall@K curves, K = 1..50, full and 100-candidate."""
        from vilbert_core.evaluation.plots import plot_recall_curves

        path = out / f"recall_at_k_{file_safe(split)}.png"
        return [plot_recall_curves(extra["ranks"], path, f"Retrieval ({split})").name]


TASK = RetrievalTask()
