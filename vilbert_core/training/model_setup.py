"""The model a run trains: a fresh one from a preset or config file, or a checkpoint (checked against the
vocabulary and the features), with the feature standardisation and the text stream from BERT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extract.config import CLS_PROB_DIM
from pipelines.formats.tasks import load_task_feature_stats
from vilbert_core.tasks import get_task

from .args import TrainArgs, TrainingError
from .data import LoaderFactory
from .distributed import (
    DistContext,
    all_reduce_sum,
)


def resolve_config(args: TrainArgs, vocab_size: int, feature_dim: int | None) -> Any:
    """The config of a freshly built model: a preset adapts to the data, a config file must match it."""
    from vilbert_core import ViLBERTConfig

    if args.config in ("vilbert-base", "tiny"):
        cfg = ViLBERTConfig.preset(args.config)
        # a preset built from scratch takes the vocabulary and feature size of the data
        cfg.vocab_size = vocab_size
        if feature_dim is not None:
            cfg.v_feature_size = feature_dim
        cfg.v_target_size = CLS_PROB_DIM
        return cfg
    if not Path(args.config).is_file():
        raise TrainingError(f"--config {args.config!r} is neither a preset (vilbert-base, tiny) nor a file")
    try:
        given = json.loads(Path(args.config).read_text(encoding="utf-8"))
        cfg = ViLBERTConfig.from_json_file(args.config)
    except (ValueError, TypeError) as err:
        raise TrainingError(f"--config {args.config}: not a ViLBERT config.json ({err})") from None
    cfg.vocab_size = vocab_size
    # a file that leaves the region feature size out (demo/vilbert_demo_config.json) takes the data's, as presets do
    if feature_dim is not None and "v_feature_size" not in given:
        cfg.v_feature_size = feature_dim
    return cfg


def check_model_matches(cfg: Any, vocab_size: int, feature_dim: int | None, where: str, vocab: str) -> None:
    """Clear errors for a vocabulary or feature size that the model was not built for."""
    if cfg.vocab_size != vocab_size:
        raise TrainingError(
            f"{where} was trained with a vocabulary of {cfg.vocab_size} tokens but --vocab {vocab} has "
            f"{vocab_size}: pass the vocabulary the checkpoint was trained with"
        )
    if feature_dim is not None and cfg.v_feature_size != feature_dim:
        if where.startswith(
            "--config"
        ):  # a fresh model: the file's number is what to change, not the features
            hint = f' Set "v_feature_size": {feature_dim} in that file, or leave it out to follow the data.'
        elif cfg.v_feature_size == 2048:
            hint = " Released ViLBERT checkpoints expect 2048-d res5 features: extract with --feature-layer res5."
        else:
            hint = ""
        raise TrainingError(
            f"the region features are {feature_dim}-d but {where} expects v_feature_size="
            f"{cfg.v_feature_size}.{hint}"
        )


def build_model(
    args: TrainArgs,
    vocab_size: int,
    feature_dim: int | None,
    num_answers: int | None,
    resume_dir: Path | None,
    feature_stats: Any = None,
) -> tuple[nn.Module, set[str]]:
    """The model to train and the names of its BERT-initialised parameters (for the lr multiplier).

    feature_stats (pipelines.feature_stats.FeatureStats): what a new model standardises its region
    features with (needed when it is built with v_feature_norm="standardize", the default).
    """
    from vilbert_core import ViLBERTForPretraining, ViLBERTForTasks

    spec = get_task(args.task)
    tasks_model = spec.model_kind == "tasks"
    cls = ViLBERTForTasks if tasks_model else ViLBERTForPretraining
    # A checkpoint keeps its own VQA answer count unless the shards' answers.json gives one: forcing a
    # count onto a checkpoint whose VQA head has another size would make loading fail on the shape.
    kwargs: dict[str, Any] = {"num_answers": num_answers} if tasks_model and num_answers is not None else {}
    if tasks_model:  # a multi-task reference checkpoint holds one answer head per task: take this task's
        kwargs["reference_answer_head"] = spec.reference_answer_head
    bert_names: set[str] = set()
    source = resume_dir or (Path(args.init_from) if args.init_from else None)
    if source is not None:
        try:
            model = cls.from_pretrained(str(source), **kwargs)
        except (ValueError, FileNotFoundError) as err:  # a refused pickle, missing or mis-shaped tensors
            raise TrainingError(f"{'--resume' if resume_dir else '--init-from'} {source}: {err}") from None
        check_model_matches(model.config, vocab_size, feature_dim, f"the checkpoint {source}", args.vocab)
        if spec.data.needs_class_distributions and model.config.v_target_size != CLS_PROB_DIM:
            # masked region modelling predicts the detector's class distribution over its 1601 classes
            raise TrainingError(
                f"the checkpoint {source} predicts {model.config.v_target_size} region classes but the "
                f"features' class distributions have {CLS_PROB_DIM} (v_target_size)"
            )
        norm = model.config.v_feature_norm
        if args.feature_norm is not None and args.feature_norm != norm:
            raise TrainingError(
                f"--feature-norm {args.feature_norm}: the checkpoint {source} was trained with "
                f"v_feature_norm={norm!r}, and its weights only fit that input; drop --feature-norm"
            )
    else:
        cfg = resolve_config(args, vocab_size, feature_dim)
        check_model_matches(cfg, vocab_size, feature_dim, f"--config {args.config}", args.vocab)
        if tasks_model:
            cfg.num_answers = num_answers or 1
        cfg.v_feature_norm = args.feature_norm or "standardize"
        model = cls(cfg)
        if cfg.v_feature_norm == "standardize":
            if feature_stats is None:
                raise TrainingError("a model that standardises its region features needs their statistics")
            if feature_stats.feature_dim != cfg.v_feature_size:
                raise TrainingError(
                    f"feature statistics of {feature_stats.feature_dim}-d features, the model takes "
                    f"{cfg.v_feature_size}-d"
                )
            model.set_feature_stats(feature_stats.mean, feature_stats.std)
    if args.init_text_from and resume_dir is None:
        bert_names = set(load_bert_text_stream(model, args.init_text_from))
    return model, bert_names


def training_feature_stats(
    args: TrainArgs, factory: LoaderFactory, per_rank: int, ctx: DistContext, max_images: int = 2000
) -> tuple[Any, str]:
    """Per-dimension statistics of the training features, and where they came from.

    A TASKDIR written by `shard` carries them (feature_stats.json, over every region of the split).
    Otherwise (older TASKDIRs, shard URL lists) they are computed from the real regions of the first
    training batches, about `max_images` examples over all ranks, summed across ranks so every rank
    gets the same numbers.
    """
    from pipelines.feature_stats import RunningFeatureStats

    try:
        stats = load_task_feature_stats(args.data)
    except ValueError as err:
        raise TrainingError(f"--data {args.data}: {err}") from None
    if stats is not None:
        return stats, f"{args.data}/feature_stats.json"
    running = RunningFeatureStats()
    for batch in factory(args.data, 0, per_rank):
        feat, mask = batch["image_feat"], batch["image_mask"]
        feat = feat.reshape(-1, *feat.shape[-2:])[:, 1:]  # (N,R-1,D): candidates folded, [IMG] dropped
        keep = mask.reshape(-1, mask.shape[-1])[:, 1:] != 0
        for f, k in zip(feat, keep, strict=True):  # one example's real regions at a time
            running.add(f[k].double().numpy())
        if running.images * ctx.world_size >= max_images:
            break
    if running.sum is None:
        raise TrainingError(f"--data {args.data}: no regions to compute the feature statistics from")
    totals = all_reduce_sum(
        ctx, torch.from_numpy(np.concatenate([running.sum, running.sumsq, [running.regions, running.images]]))
    ).numpy()
    d = running.sum.shape[0]
    running.sum, running.sumsq = totals[:d], totals[d : 2 * d]
    running.regions, running.images = int(round(totals[2 * d])), int(round(totals[2 * d + 1]))
    return (
        running.result(),
        f"the regions of the first {running.images} training examples (no feature_stats.json)",
    )


def load_bert_text_stream(model: nn.Module, bert_dir: str) -> list[str]:
    """Load a Hugging Face BERT folder into the text stream; returns the loaded parameter names."""
    from vilbert_core import init_text_from_bert

    try:
        report = init_text_from_bert(model, bert_dir)
    except (FileNotFoundError, ValueError) as err:
        raise TrainingError(f"--init-text-from {bert_dir}: {err}") from None
    names = set(dict(model.named_parameters()))
    return sorted(n for n in report.loaded if n in names)
