"""Image-text retrieval: the pair head (or, zero-shot, a pretraining model's alignment head) ranks pairs.

Training: cross-entropy over the positive and its 3 negatives; validation: the positive ranked first.
Evaluation: image and text retrieval R@1/5/10 over every (image, caption) pair of the split and under
the 100-candidate protocol, beside the exact chance level; what depends on one side only is computed
once (`score_all_pairs`).
"""

from __future__ import annotations

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
    from pipelines.datasets import TaskDataset, collate_regions, collate_texts

    ds = TaskDataset(
        str(data_dir), "retrieval", loaded.tokenizer, batch_size=None, max_text_len=loaded.max_text_len,
        max_regions=loaded.max_regions, shuffle_buffer=1, feature_dim=loaded.feature_dim,
    )  # fmt: skip
    regions, image_ids, texts, caption_image = [], [], [], []
    try:
        for key, records, image_regions in ds.images():
            if max_images is not None and len(image_ids) >= max_images:
                break
            texts.extend(r["caption"] for r in records)
            caption_image.extend([len(image_ids)] * len(records))
            regions.append(image_regions)
            image_ids.append(key)
    except ValueError as err:  # a sample of another feature size than the model's
        raise EvalError(f"--data {data_dir}: {err}") from None
    if not image_ids or not texts:
        raise EvalError(f"--data {data_dir}: no images or no captions")
    images = collate_regions(regions, (len(regions),))
    del images["image_target"]  # scoring reads no class distributions
    text = collate_texts(ds.tokenizer.encode_batch(texts), (len(texts),), ds.tokenizer.pad_id)
    return images, text, torch.tensor(caption_image), image_ids


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
    img = torch.arange(n_img).repeat_interleave(n_cap)  # image-major: each image's states stay hot
    cap = torch.arange(n_cap).repeat(n_img)
    desc = f"retrieval {n_img}x{n_cap}"
    scores = score_pair_list(loaded, images, text, img, cap, batch_size, progress, caption_chunk, desc)
    return scores.view(n_img, n_cap)


@torch.inference_mode()
def score_pair_list(
    loaded: LoadedModel,
    images: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    img: torch.Tensor,
    cap: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    caption_chunk: int = 1024,
    desc: str = "pairs",
) -> torch.Tensor:
    """Scores (P,) of the pairs (img[p], cap[p]) of a retrieval set, each side's part computed once.

    Captions are taken `caption_chunk` at a time (their text states bound the memory); within a chunk
    the pairs keep their given order, in batches of `batch_size`.
    """
    scores = torch.empty(img.numel(), dtype=torch.float32)
    dev, model = loaded.device, loaded.model
    image_mask = images["image_mask"].to(dev)
    region_counts = image_mask.sum(1)
    n_img, n_cap = image_mask.shape[0], text["input_ids"].shape[0]
    # (N_img, R, v_hidden): once per image
    image_states = torch.cat(
        [
            model.vilbert.embed_image(*(images[k][i : i + batch_size].to(dev) for k in IMAGE_KEYS))
            for i in range(0, n_img, batch_size)
        ]
    )
    with tqdm(total=img.numel(), desc=desc, unit="pair", disable=not progress) as bar:
        for c0 in range(0, n_cap, caption_chunk):
            in_chunk = ((cap >= c0) & (cap < c0 + caption_chunk)).nonzero().squeeze(1)
            if in_chunk.numel() == 0:
                continue
            chunk = {k: v[c0 : c0 + caption_chunk].to(dev) for k, v in text.items()}
            # (n, T, hidden): once per caption
            text_states = torch.cat(
                [
                    model.vilbert.embed_text(*(chunk[k][i : i + batch_size] for k in TEXT_KEYS))
                    for i in range(0, chunk["input_ids"].shape[0], batch_size)
                ]
            )
            token_counts = chunk["attention_mask"].sum(1)
            for start in range(0, in_chunk.numel(), batch_size):
                rows = in_chunk[start : start + batch_size]
                i, c = img[rows].to(dev), (cap[rows] - c0).to(dev)
                # trim padding shared by the whole batch: fewer tokens and regions, same scores
                t, r = int(token_counts[c].max()), int(region_counts[i].max())
                masks = [chunk["attention_mask"][c, :t], image_mask[i, :r]]
                # no padding left: the model may use its fastest unmasked attention
                masks = [None if bool(m.all()) else m for m in masks]
                scores[rows] = model.score_pairs(text_states[c, :t], image_states[i, :r], *masks).float().cpu()
                bar.update(rows.numel())
    return scores


@torch.inference_mode()
def rerank_top_k(
    loaded: LoadedModel,
    images: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    scores: torch.Tensor,
    k: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Each query's top k of a cheaper first stage, rescored in fp32 and ranked first.

    scores: (N_img, N_cap) first-stage scores (bf16 autocast). Image retrieval (a caption ranks the
    images) and text retrieval (an image ranks the captions) each take their query's k best pairs by
    `scores`, rescore them with autocast off, and rank them above every other pair in their exact order;
    the other pairs keep the first stage's order below them. A pair in both directions' top k is scored
    once. Returns (image-retrieval scores, text-retrieval scores), both (N_img, N_cap) float64, and
    {"pairs", "seconds", "top1_changed"}: the pairs rescored, their time, and the share of queries (%)
    whose first item the rescoring changed.
    """
    n_img, n_cap = scores.shape
    k_img, k_cap = min(k, n_img), min(k, n_cap)
    # a stable sort: tied first-stage scores (bf16 rounds them) go to the lower index, as the metrics rank them
    top_img = scores.sort(dim=0, descending=True, stable=True).indices[:k_img]  # (k_img, N_cap): each caption's best images
    top_cap = scores.sort(dim=1, descending=True, stable=True).indices[:, :k_cap]  # (N_img, k_cap)
    cols = torch.arange(n_cap).expand(k_img, n_cap)
    rows = torch.arange(n_img)[:, None].expand(n_img, k_cap)
    keys_img, keys_cap = top_img * n_cap + cols, rows * n_cap + top_cap  # flat pair ids
    flat = torch.unique(torch.cat([keys_img.flatten(), keys_cap.flatten()]))  # sorted
    t0 = time.perf_counter()
    with torch.autocast(loaded.device.type, enabled=False):  # the second stage is exact
        exact = score_pair_list(
            loaded, images, text, flat // n_cap, flat % n_cap, batch_size, progress, desc=f"rerank top {k}"
        ).double()
    seconds = time.perf_counter() - t0
    base = scores.double()
    lift = float(base.max() - exact.min()) + 1.0  # puts every rescored pair above every first-stage score
    image_scores, text_scores = base.clone(), base.clone()
    image_scores[top_img, cols] = exact[torch.searchsorted(flat, keys_img)] + lift
    text_scores[rows, top_cap] = exact[torch.searchsorted(flat, keys_cap)] + lift
    changed = torch.cat([image_scores.argmax(0) != top_img[0], text_scores.argmax(1) != top_cap[:, 0]])
    stats = {"pairs": int(flat.numel()), "seconds": round(seconds, 3),
             "top1_changed": round(100.0 * changed.float().mean().item(), 3)}  # fmt: skip
    return image_scores, text_scores, stats


class RetrievalTask(Task):
    """Caption-image matching."""

    name = "retrieval"
    shard_task = "retrieval"
    eval_kinds = ("tasks", "pretraining")  # a pretraining model is scored zero-shot
    heads = "a pair head"
    defaults = TaskDefaults(batch_size=64, lr=2e-5, epochs=20, metric="accuracy")
    writes_predictions = False
    reranks = True

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
        text_scores, rerank = None, None
        if options.rerank_top_k:
            scores, text_scores, rerank = rerank_top_k(
                loaded, images, text, scores, options.rerank_top_k, options.batch_size, options.progress
            )
            rerank["top_k"] = options.rerank_top_k
        seconds = time.perf_counter() - t0
        ranks = retrieval_ranks(scores, caption_image, options.num_candidates, options.seed, text_scores)
        metrics: dict[str, Any] = {name: recall_at_k(r) for name, r in ranks.items()}
        metrics.update(
            {
                "num_images": len(image_ids),
                "num_captions": int(caption_image.numel()),
                "zero_shot": loaded.kind == "pretraining",
                "scoring_seconds": round(seconds, 3),
                "pairs_per_second": round(scores.numel() / max(seconds, 1e-9), 1),  # first stage and rerank
                "candidate_seed": options.seed,
                "max_images": options.max_images,
                "baselines": {"chance": retrieval_chance(caption_image, len(image_ids), options.num_candidates)},
            }
        )
        if rerank:
            metrics["rerank"] = rerank
        return metrics, {"ranks": ranks, "image_ids": image_ids}

    def report(self, metrics: dict) -> tuple[list[str], dict[str, dict]]:
        """One table: R@K per protocol, with the chance R@1."""
        groups = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        recalls = {k: v for k, v in groups.items() if k not in ("baselines", "rerank")}
        chance = (groups.get("baselines") or {}).get("chance", {})
        lines: list[str] = []
        if recalls:
            head = "| protocol | " + " | ".join(f"R@{k}" for k in RECALL_KS)
            lines += [head + (" | chance R@1 |" if chance else " |"), "|---" * (len(RECALL_KS) + 1 + bool(chance)) + "|"]
            for name, rec in recalls.items():
                cells = [fmt(rec[f"r{k}"]) for k in RECALL_KS] + ([fmt(chance[name]["r1"])] if name in chance else [])
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        if rerank := groups.get("rerank"):
            lines += [f"Re-ranked: each query's top {rerank['top_k']} of the first pass rescored in fp32 "
                      f"({rerank['pairs']} pairs, {rerank['seconds']:.1f} s); the first item changed for "
                      f"{rerank['top1_changed']:.2f}% of the queries.", ""]
        return lines, {}

    def plots(self, split: str, metrics: dict, extra: Any, out: Path) -> list[str]:
        """Recall@K curves, K = 1..50, full and 100-candidate."""
        from vilbert_core.evaluation.plots import plot_recall_curves

        path = out / f"recall_at_k_{file_safe(split)}.png"
        return [plot_recall_curves(extra["ranks"], path, f"Retrieval ({split})").name]


TASK = RetrievalTask()
