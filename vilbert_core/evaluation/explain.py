"""`run_explain`: a picture of what a ViLBERT model looks at for one image and one text.

The picture shows the image with its detected regions and, for every word of the text, the regions
the word attends to most in the LAST co-attention layer (text -> image probabilities averaged over the
heads; word pieces of one word averaged), plus what the model's heads say about the pair:

- a pretraining model: the alignment probability sigmoid(align_logit);
- a model with a VQA head (answers known): the top answers with their sigmoid scores;
- a referring-expression model: the ranking of the regions by the region head, drawn on the image;
- a VCR / retrieval model: the pair score.

Regions come from the feature set (docs/contracts.md section 2) exactly as the datasets build them
(global [IMG] region first, then at most `max_regions` detected regions in file order). The image is
read from the `source` recorded in the sample's json member (or `image=` when it has moved).
A JSON file with the same numbers is written beside the PNG.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.fileio import atomic_write_json
from pipelines.formats.features import FeatureSet
from pipelines.formats.npy import load_npy

from .loading import EvalError, LoadedModel, load_model
from .plots import save_figure

HEADS = ("auto", "align", "vqa", "refer", "pair")
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")


# ---------------------------------------------------------------------------------------------- inputs
def read_feature_sample(features: str | Path, image_id: str) -> dict[str, bytearray]:
    """The members of one image's sample in a feature set ({"boxes.npy": bytes, ..., "json": bytes}).

    The per-shard parquet indexes say which shard holds the image, so only that tar is read.
    """
    root = Path(features)
    try:
        fs = FeatureSet.open(root, unfinished=True)
    except ValueError as err:  # a damaged dataset.json, a shard it lists missing
        raise EvalError(f"--features {err}") from None
    if not fs.shards:
        raise EvalError(
            f"--features {root}: no feature shards with their index; is this a feature set of `vilbert-data extract`?"
        )
    try:
        return fs.sample(image_id)
    except KeyError as err:
        raise EvalError(str(err)) from None


def load_source_image(source: str, override: str | Path | None = None) -> Any:
    """The image a sample was extracted from (PIL RGB, EXIF-rotated as the detector saw it)."""
    from PIL import Image, ImageOps

    where = str(override) if override is not None else source
    try:
        if "://" in where:
            import fsspec

            with fsspec.open(where, "rb") as f:
                data = f.read()
        else:
            data = Path(where).read_bytes()
        img = Image.open(io.BytesIO(data))
        return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError) as err:
        raise EvalError(
            f"cannot read the image {where!r} of this sample ({err}); pass --image PATH if it has moved"
        ) from None


def merge_word_pieces(tokens: list[str], rows: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Whole words and their attention rows: "##" pieces join the previous word, rows are averaged.

    tokens: T token strings; rows: (T,R). Special tokens are dropped.
    """
    words: list[str] = []
    groups: list[list[int]] = []
    for i, tok in enumerate(tokens):
        if tok in SPECIAL_TOKENS:
            continue
        if tok.startswith("##") and groups:
            words[-1] += tok[2:]
            groups[-1].append(i)
        else:
            words.append(tok)
            groups.append([i])
    if not groups:
        return [], rows.new_zeros(0, rows.shape[1])
    return words, torch.stack([rows[g].mean(0) for g in groups])


@dataclass
class Explanation:
    """What the picture shows, also written as JSON beside it."""

    image_id: str
    text: str
    words: list[str]
    word_regions: list[
        list[tuple[int, float]]
    ]  # per word: (detected box index, attention weight), heaviest first
    alignment_probability: float | None
    pair_score: float | None
    vqa_answers: list[tuple[str, float]] | None
    region_ranking: list[tuple[int, float]] | None  # (detected box index, sigmoid score), best first

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------- model
def _auto_head(loaded: LoadedModel) -> str:
    """What `--head auto` reports: the training task's explain head (align for any pretraining model).

    A bare checkpoint (no training task) with an answer list reports its answers; else the pair score.
    """
    from vilbert_core.tasks import tasks

    if loaded.kind == "pretraining":
        return "align"
    spec = tasks().get(loaded.train_task or "")
    if spec is not None and spec.model_kind == loaded.kind:
        head = spec.explain_head
    else:
        head = "vqa" if loaded.train_task is None else "pair"
    # an answer head without its answer list (a bare checkpoint) can only be read as a pair score
    return "pair" if head == "vqa" and loaded.answers is None else head


def resolve_head(loaded: LoadedModel, head: str) -> str:
    """The head to report for `--head` (auto: by model kind and training task); fails when the model lacks it."""
    if head not in HEADS:
        raise EvalError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "auto":
        head = _auto_head(loaded)
    if head == "align" and loaded.kind != "pretraining":
        raise EvalError("--head align needs a pretraining model (a fine-tuned model has no alignment head)")
    if head in ("vqa", "refer", "pair") and loaded.kind != "tasks":
        raise EvalError(
            f"--head {head} needs a fine-tuned model (ViLBERTForTasks); this is a pretraining model"
        )
    if head == "vqa" and loaded.answers is None:
        raise EvalError("--head vqa needs the answer list: a VQA run directory, or --answers FILE")
    return head


@torch.inference_mode()
def explain_pair(
    loaded: LoadedModel,
    sample: dict[str, bytes],
    image_id: str,
    text: str,
    head: str = "auto",
    top_k: int = 3,
) -> tuple[Explanation, np.ndarray]:
    """Run the model on one (image, text) pair -> the explanation and the detected boxes it refers to (K,4)."""
    from pipelines.datasets import build_regions

    head = resolve_head(loaded, head)  # before the forward pass: a wrong --head fails at once
    regions = build_regions(sample, loaded.max_regions)
    if regions.feat.shape[1] != loaded.feature_dim:
        raise EvalError(
            f"image {image_id} has {regions.feat.shape[1]}-d region features but the model expects "
            f"{loaded.feature_dim}-d"
        )
    boxes = load_npy(sample["boxes.npy"])[: regions.num_detected]  # (K,4)
    enc = loaded.tokenizer.tokenizer.encode(text)  # the same encoding as TextTokenizer.encode, with offsets
    ids, segments = enc.ids, enc.type_ids
    dev = loaded.device
    inputs = {
        "input_ids": torch.tensor([ids], device=dev),
        "token_type_ids": torch.tensor([segments], device=dev),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=dev),
        "image_feat": torch.tensor(regions.feat, device=dev)[None],
        "image_loc": torch.tensor(regions.loc, device=dev)[None],
        "image_mask": torch.ones(1, regions.feat.shape[0], dtype=torch.long, device=dev),
    }
    out = loaded.model(**inputs, output_attentions=True)
    if not out.co_attentions:
        raise EvalError("the model has no co-attention layers (with_coattention is off): nothing to draw")
    text_to_image = out.co_attentions[-1][0][0].float().mean(0).cpu()  # (H,T,R) -> (T,R)
    # an unknown word is shown as written, not as [UNK]
    tokens = [
        text[a:b] if t == "[UNK]" and b > a else t for t, (a, b) in zip(enc.tokens, enc.offsets, strict=True)
    ]
    words, rows = merge_word_pieces(tokens, text_to_image)
    detected = rows[:, 1:]  # the global [IMG] region is not a box to draw
    k = min(top_k, detected.shape[1])
    word_regions = []
    for row in detected:
        w, idx = row.topk(k)
        word_regions.append([(int(i), float(v)) for v, i in zip(w, idx, strict=True)])

    align = pair = answers = ranking = None
    if head == "align":
        align = float(torch.sigmoid(out.align_logit[0]))
    elif head == "pair":
        pair = float(torch.sigmoid(out.pair_logit[0]))
    elif head == "vqa":
        p = torch.sigmoid(out.vqa_logits[0].float())
        top = p.topk(min(5, p.numel()))
        answers = [(loaded.answers[int(i)], float(v)) for v, i in zip(top.values, top.indices, strict=True)]
    else:
        scores = torch.sigmoid(out.region_logits[0, 1:].float())  # detected regions only
        order = scores.argsort(descending=True, stable=True)[:5]  # ties: lower box first
        ranking = [(int(i), float(scores[i])) for i in order]
    expl = Explanation(image_id, text, words, word_regions, align, pair, answers, ranking)
    return expl, boxes


# ---------------------------------------------------------------------------------------------- drawing
def _draw_boxes(ax: Any, boxes: np.ndarray, picks: list[tuple[int, float]], cmap: Any, labels: bool) -> None:
    """Outline the picked boxes, colour and width by weight (relative to the heaviest)."""
    from matplotlib.patches import Rectangle

    top = max((w for _, w in picks), default=1.0) or 1.0
    for rank, (i, w) in enumerate(picks):
        x1, y1, x2, y2 = boxes[i]
        rel = w / top
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=cmap(0.35 + 0.65 * rel),
                               linewidth=1 + 2.5 * rel))  # fmt: skip
        if labels:
            ax.text(x1 + 2, y1 + 2, str(rank + 1), color="white", fontsize=7, va="top",
                    bbox={"facecolor": cmap(0.35 + 0.65 * rel), "pad": 1, "linewidth": 0})  # fmt: skip


def draw_explanation(
    image: Any, boxes: np.ndarray, expl: Explanation, out: str | Path, size: tuple[int, int]
) -> Path:
    """Draw the explanation into a PNG of exactly `size` = (width, height) pixels; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    width, height = size
    if width < 200 or height < 150:
        raise EvalError(f"--size {width}x{height} is too small to draw (at least 200x150)")
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    n_words = min(len(expl.words), 12)
    cols = max(1, min(n_words, 4))
    word_rows = math.ceil(n_words / cols) if n_words else 0
    grid = fig.add_gridspec(1 + word_rows, cols * 2, height_ratios=[2.2] + [1.0] * word_rows,
                            left=0.02, right=0.98, top=0.95, bottom=0.02, hspace=0.3, wspace=0.15)  # fmt: skip
    cmap = plt.get_cmap("autumn_r")

    ax = fig.add_subplot(grid[0, :cols])
    ax.imshow(image)
    for x1, y1, x2, y2 in boxes:
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="#66ccff", linewidth=0.6, alpha=0.7)
        )
    if expl.region_ranking:
        _draw_boxes(ax, boxes, expl.region_ranking, plt.get_cmap("winter_r"), labels=True)
    ax.set_title(f"{expl.image_id}: {len(boxes)} regions", fontsize=9)
    ax.axis("off")

    info = fig.add_subplot(grid[0, cols:])
    info.axis("off")
    lines = [f'text: "{expl.text}"', ""]
    if expl.alignment_probability is not None:
        lines.append(f"alignment probability: {expl.alignment_probability:.3f}")
    if expl.pair_score is not None:
        lines.append(f"pair score (sigmoid): {expl.pair_score:.3f}")
    if expl.vqa_answers:
        lines.append("top VQA answers:")
        lines += [f"  {a}: {p:.3f}" for a, p in expl.vqa_answers]
    if expl.region_ranking:
        lines.append("region ranking (box: score):")
        lines += [f"  #{r + 1} box {i}: {p:.3f}" for r, (i, p) in enumerate(expl.region_ranking)]
    lines += ["", "per word: heaviest regions of the last", "co-attention layer (mean over heads)"]
    info.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace", wrap=True)

    for n in range(n_words):
        r, c = divmod(n, cols)
        wax = fig.add_subplot(grid[1 + r, 2 * c : 2 * c + 2])
        wax.imshow(image, alpha=0.75)
        _draw_boxes(wax, boxes, expl.word_regions[n], cmap, labels=True)
        weights = ", ".join(f"{w:.3f}" for _, w in expl.word_regions[n])
        wax.set_title(f"{expl.words[n]}  [{weights}]", fontsize=7)
        wax.axis("off")

    return save_figure(fig, out)  # at the figure's dpi, no tight bbox: the size stays exact


def run_explain(
    model: str | Path | LoadedModel,
    features: str | Path,
    image_id: str,
    text: str,
    out: str | Path,
    *,
    size: tuple[int, int] = (1200, 900),
    image: str | Path | None = None,
    head: str = "auto",
    top_k: int = 3,
    vocab: str | Path | None = None,
    answers: str | Path | None = None,
    device: str = "auto",
) -> Explanation:
    """Draw what `model` attends to for (`image_id` of the feature set, `text`) into the PNG `out`."""
    if not text.strip():
        raise EvalError("--text is empty")
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, vocab=vocab, answers=answers, device=device)
    )
    sample = read_feature_sample(features, image_id)
    meta = json.loads(sample["json"])
    picture = load_source_image(meta.get("source", ""), image)
    expl, boxes = explain_pair(loaded, sample, image_id, text, head, top_k)
    w, h = meta.get("width"), meta.get("height")
    if w and h and picture.size != (w, h):
        # a moved or resized copy of the image: boxes are in the extracted image's pixels
        boxes = boxes * np.array([picture.width / w, picture.height / h] * 2, dtype=np.float32)
    draw_explanation(picture, boxes, expl, out, size)
    atomic_write_json(Path(out).with_suffix(".json"), expl.to_json(), sort_keys=False)
    return expl
