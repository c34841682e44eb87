"""`vilbert-data shard`: join a feature set with a task's annotations into task shards.

Flow (docs/contracts.md sections 2 and 3): read `dataset.json` and the per-shard parquet indexes (no
features), read the annotations (small; held in a dict keyed by feature image id), then stream the
feature shards in order and write one task sample per annotated image: its regions once, with all its
records in `ann.json`. Memory stays flat: at most one feature sample is decoded at a time.

Output shards are written under a temporary name and renamed when complete, each followed by its
parquet index; `task.json` is written last, so a directory with `task.json` is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.annotations import Annotation, read_task_annotations
from pipelines.feature_stats import STATS_FILE, RunningFeatureStats
from pipelines.fileio import (
    atomic_write_json,
    check_out_dir,
    disk_full_error,
    is_disk_full,
    make_out_dir,
    remove_stale_temps,
    write_jsonl,
)
from pipelines.formats.features import FeatureSet
from pipelines.formats.npy import load_npy
from pipelines.formats.tar import ShardError
from pipelines.formats.tasks import SHARD_PREFIX, TASK_FORMAT, TaskShardWriter
from pipelines.matching import ImageMatcher
from pipelines.progress import progress_bar
from pipelines.tasks import DataTask, data_task
from pipelines.vqa_answers import (
    DEFAULT_MIN_COUNT,
    load_answer_vocab,
    save_answer_vocab,
)

log = logging.getLogger(__name__)

REGION_MEMBERS = ("features.npy", "spatial.npy", "boxes.npy", "cls_prob.npy")


# ----------------------------------------------------------------------------- per-task records


def _summary(ann: Annotation) -> dict[str, Any]:
    """Identifying fields of a record for the missing-image report."""
    keys = ("question_id", "annot_id", "ref_id", "sent_id")
    out = {k: ann.record[k] for k in keys if k in ann.record}
    text = ann.record.get("caption") or ann.record.get("question") or ann.record.get("sentence") or ""
    out["text"] = text[:80]
    return out


# ----------------------------------------------------------------------------- the job


def join_annotations(
    anns: Sequence[Annotation], matcher: ImageMatcher
) -> tuple[dict[str, list[Annotation]], list[dict[str, Any]]]:
    """Annotations grouped by feature image id, and report rows for those whose image has no features."""
    by_image: dict[str, list[Annotation]] = {}
    missing: list[dict[str, Any]] = []
    for ann in anns:
        m = matcher.match(ann.ref)
        if m.image_id is None:
            missing.append(
                {"image": str(ann.ref), "reason": m.reason, "candidates": m.candidates, **_summary(ann)}
            )
        else:
            by_image.setdefault(m.image_id, []).append(ann)
    return by_image, missing


# Splits that `shard` can name for the tasks whose annotation files hold one split each (captions, vqa,
# vcr, ...): the name is only recorded, so a typo would pass unnoticed; refcoco and retrieval select by it.
SPLIT_PREFIXES = ("train", "val", "test", "dev", "minival", "restval")


def check_split_name(task: str, split: str) -> None:
    """Refuse a --split name that is no split (a typo) for tasks that only record it."""
    if data_task(task).split_selects_records:
        return  # their readers select records by the split and say which splits exist
    if not split.lower().startswith(SPLIT_PREFIXES):
        raise ShardError(
            f"--split {split!r} is not a split name: {task} takes one starting with "
            f"{', '.join(SPLIT_PREFIXES)} (e.g. train, val2014, test-dev)"
        )


def read_answers_option(answers: str | Path) -> list[str]:
    """The answer list given with --answers, or a ShardError naming the option."""
    try:
        return load_answer_vocab(answers)
    except ValueError as err:
        raise ShardError(f"--answers {err}") from None


def run_shard(
    features: str | Path,
    task: str,
    annotations: Sequence[str | Path],
    split: str,
    out: str | Path,
    shard_size: int = 1000,
    answers: str | Path | None = None,
    min_answer_count: int = DEFAULT_MIN_COUNT,
    images: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    detector_config: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write TASKDIR task shards for one task and split; returns the `task.json` content.

    VCR only: `images` is the vcr1images folder (images + metadata json), `weights` the detector
    checkpoint for the ground-truth boxes' features (None = random weights, tests only) and
    `detector_config` an optional `extract.DetectorConfig`.
    """
    try:
        spec = data_task(task)
    except ValueError as err:
        raise ShardError(str(err)) from None
    if shard_size < 1:
        raise ShardError(f"--shard-size must be >= 1, got {shard_size}")
    check_split_name(task, split)
    try:
        check_out_dir(out)
    except ValueError as err:
        raise ShardError(str(err)) from None
    answer_list = read_answers_option(answers) if (spec.answer_vocab and answers) else None
    fs = FeatureSet.open(features)
    fs.require("feature_layer", "feature_dim", "shards")
    _refuse_what_the_features_lack(fs, task)
    anns = read_task_annotations(task, annotations, split, images_dir=images)
    try:
        out = make_out_dir(out)
    except ValueError as err:
        raise ShardError(str(err)) from None
    try:
        return _write_task_dir(fs, spec, anns, annotations, split, out, shard_size, answer_list, min_answer_count,
                               weights, device, detector_config, progress)  # fmt: skip
    except OSError as err:
        if is_disk_full(err):
            remove_stale_temps(out)  # the shard being written: its space back now, not at the rerun
            # not a bad input: the job could not finish (exit status 1, as extract)
            raise disk_full_error(out, "the task shards", "free space and rerun the same command") from None
        raise ShardError(f"{err.filename or out}: {err.strerror or err}") from None


def _write_task_dir(
    fs: FeatureSet, spec: DataTask, anns: list[Annotation], annotations: Sequence[str | Path], split: str, out: Path,
    shard_size: int, answers: list[str] | None, min_answer_count: int, weights: str | Path | None, device: str,
    detector_config: Any, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """The body of run_shard once its inputs are checked: write the shards, the report and task.json."""
    for stale in [out / "task.json", out / STATS_FILE, *out.glob(f"{SHARD_PREFIX}*.tar"),
                  *out.glob(f"{SHARD_PREFIX}*.parquet")]:  # fmt: skip
        stale.unlink(missing_ok=True)  # a previous run: task.json first, so the folder reads as incomplete
    remove_stale_temps(out)  # half-written shards of a killed run
    report = out / "report"
    report.mkdir(exist_ok=True)

    task = spec.name
    images = fs.ok_images()
    by_image, missing = join_annotations(anns, ImageMatcher(images))
    answer_file, vocab = None, None
    if spec.answer_vocab:
        vocab = spec.attach_targets(anns, answers, min_answer_count, split)
        if not vocab:
            raise ShardError(
                f"empty answer vocabulary (no answer seen {min_answer_count}+ times); lower --min-answer-count"
            )
        answer_file = "answers.json"
        save_answer_vocab(vocab, out / answer_file)
    context = spec.shard_context(fs, str(weights) if weights else None, device, detector_config)

    writer = TaskShardWriter(out, shard_size)
    # per-dimension statistics of every region written, which `train` standardises the features with
    stats = RunningFeatureStats()
    written: set[str] = set()
    without_annotations: list[str] = []
    n_records = 0
    failures: list[dict[str, str]] = []
    bar = progress_bar(len(images), f"shard {task}/{split}", "img", progress)
    # Images without annotations in this split are skipped unread (their sample is empty).
    for key, sample in fs.samples(keep=by_image.__contains__):
        bar.update(1)
        group = by_image.get(key)
        if group is None:
            without_annotations.append(key)
            continue
        if key in written:
            continue  # the same image twice in a feature set: first copy wins
        try:
            members, row, regions = _task_sample(key, sample, group, spec, fs, context)
        except Exception as exc:  # one bad image must not stop a long job: record it and go on
            failures.append({"image_id": key, "error": f"{type(exc).__name__}: {exc}"})
            continue
        writer.write(key, members, row)
        for feats in regions:
            stats.add(feats)
        written.add(key)
        n_records += len(group)
    bar.close()
    writer.close()
    for image_id in sorted(set(by_image) - written - {f["image_id"] for f in failures}):
        for ann in by_image[image_id]:  # indexed as ok but absent from the tars
            missing.append(
                {"image": str(ann.ref), "reason": "not_in_shards", "candidates": [], **_summary(ann)}
            )

    feature_stats = stats.result()
    if feature_stats is not None:
        feature_stats.save(out / STATS_FILE)
    write_jsonl(report / "missing_images.jsonl", missing)
    (report / "images_without_annotations.txt").write_text("".join(f"{k}\n" for k in without_annotations))
    write_jsonl(report / "failures.jsonl", failures)
    task_counts, warnings = spec.shard_report(anns, report)
    reasons: dict[str, int] = {}
    for m in missing:
        reasons[m["reason"]] = reasons.get(m["reason"], 0) + 1
    task_info = {
        "format": TASK_FORMAT,
        "version": 1,
        "task": task,
        "split": split,
        "counts": {
            "images": len(written),
            "records": n_records,
            "annotations": len(anns),
            "annotations_without_features": len(missing),
            "missing_by_reason": reasons,
            "images_without_annotations": len(without_annotations),
            "failed": len(failures),
            **task_counts,
        },
        "features": {
            "path": str(fs.root.resolve()),
            "dataset_json_sha256": fs.sha256,
            "feature_layer": fs.info["feature_layer"],
            "feature_dim": fs.feature_dim,
            "dtype": fs.info.get("dtype"),
            # false for a set converted from features without cls_prob (zeros stored; see convert)
            "class_distributions": bool(fs.info.get("class_distributions", True)),
        },
        "feature_stats": STATS_FILE if feature_stats is not None else None,
        "answer_vocab": answer_file,
        "num_answers": len(vocab) if vocab is not None else None,
        "annotation_files": [str(Path(a)) for a in annotations],
        "shards": writer.shards,
        "warnings": warnings,
    }
    atomic_write_json(out / "task.json", task_info, sort_keys=False)
    return task_info


def _refuse_what_the_features_lack(fs: FeatureSet, task: str) -> None:
    """A converted feature set may lack what a task trains on (class distributions for MRM): say so now."""
    from pipelines.convert_job import lacking_for_task

    problem = lacking_for_task(fs.info, task)
    if problem:
        raise ShardError(f"{fs.root}: {problem}")


def _task_sample(
    key: str,
    sample: dict[str, bytes],
    group: list[Annotation],
    spec: DataTask,
    fs: FeatureSet,
    context: Any,
) -> tuple[dict[str, bytes], dict[str, Any], list[np.ndarray]]:
    """Members, index row and region feature arrays of one task sample (its regions once, all its records)."""
    absent = [m for m in (*REGION_MEMBERS, "json") if m not in sample]
    if absent:
        raise ShardError(f"feature sample {key} lacks {', '.join(absent)}")
    meta = json.loads(sample["json"])
    feats = load_npy(sample["features.npy"])
    if feats.ndim != 2 or feats.shape[1] != fs.feature_dim:
        raise ShardError(
            f"feature sample {key}: features {feats.shape} but dataset.json says D={fs.feature_dim}"
        )
    members = {m: sample[m] for m in REGION_MEMBERS}
    members["meta.json"] = json.dumps(
        {"image_id": key, "width": meta["width"], "height": meta["height"], "num_boxes": int(feats.shape[0])}
    ).encode()
    records = [dict(a.record) for a in group]
    # what needs the image's regions: RefCOCO IoUs in the records, VCR ground-truth box features
    members.update(spec.sample_members(sample, group, records, context))
    members["ann.json"] = json.dumps(records, ensure_ascii=False).encode()
    # every region written counts for the statistics: VCR's ground-truth boxes, NLVR2's second image
    regions = [feats] + [load_npy(members[m]) for m in sorted(members) if m.endswith("_features.npy")]
    return members, {"num_boxes": int(feats.shape[0]), "num_records": len(records)}, regions
