"""`vilbert-data shard`: join a feature set with a task's annotations into task shards.

Flow (docs/contracts.md sections 2 and 3): read `dataset.json` and the per-shard parquet indexes (no
features), read the annotations (small; held in a dict keyed by feature image id), then stream the
feature shards in order and write one task sample per annotated image: its regions once, with all its
records in `ann.json`. Memory stays flat: at most one feature sample is decoded at a time.

Output shards are written under a temporary name and renamed when complete, each followed by its
parquet index; `task.json` is written last, so a directory with `task.json` is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.annotations import Annotation, read_task_annotations
from pipelines.feature_stats import STATS_FILE, RunningFeatureStats
from pipelines.matching import ImageMatcher
from pipelines.progress import progress_bar
from pipelines.tasks import DataTask, data_task
from pipelines.vqa_answers import DEFAULT_MIN_COUNT, load_answer_vocab, save_answer_vocab
from pipelines.writers import (
    atomic_write_json,
    atomic_write_table,
    check_out_dir,
    disk_full_error,
    is_disk_full,
    load_npy,
    make_out_dir,
    publish,
    remove_stale_temps,
    temp_path,
)

log = logging.getLogger(__name__)

TASK_FORMAT = "vilbert-data/task"
REGION_MEMBERS = ("features.npy", "spatial.npy", "boxes.npy", "cls_prob.npy")


class ShardError(ValueError):
    """Bad input to the shard job (feature set, options); the message names the input."""


# ----------------------------------------------------------------------------- tar streaming


def _octal(field: bytes) -> int:
    """Number in a tar header field (octal text, or base-256 for large GNU sizes)."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header, if any."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def _skip(stream: IO[bytes], n: int, name: str) -> None:
    """Move `n` bytes ahead in a tar stream without keeping them (a seek where the stream can)."""
    if n <= 0:
        return
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        stream.seek(n - 1, io.SEEK_CUR)
        if not stream.read(1):  # a seek past the end does not fail: check the last byte is there
            raise ShardError(f"{name}: truncated tar (member cut short)")
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise ShardError(f"{name}: truncated tar (member cut short)")
        n -= len(chunk)


def sample_key(member: str) -> tuple[str, str]:
    """(WebDataset key, suffix) of a tar member name: the key is the base name up to its first dot."""
    key, _, suffix = member.rsplit("/", 1)[-1].partition(".")
    return key, suffix


def iter_tar_members(
    stream: IO[bytes], name: str = "<stream>", keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytearray | None]]:
    """(member name, bytes) of the regular files of an uncompressed tar stream, in order.

    A small header parser instead of `tarfile`: reading WebDataset samples is the data loader's hot
    loop and `tarfile`'s per-member Python overhead dominated it. Handles ustar (with prefix), GNU
    long names and pax path records, which is what `tarfile` and `webdataset.TarWriter` write.
    With `keep`, a member whose name it rejects is not read (skipped over) and comes with None.
    """
    long_name: str | None = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            if 0 < len(header) < 512:
                raise ShardError(f"{name}: truncated tar (partial header)")
            return
        if header[257:262] != b"ustar":
            raise ShardError(f"{name}: not a tar file (no ustar header)")
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = size + (-size % 512)  # members are padded to the next 512-byte block
        if kind not in (b"0", b"\0", b"7", b"L", b"x"):
            long_name = None
            _skip(stream, padded, name)
            continue  # directories, links, global pax headers: not sample data
        member = long_name
        if member is None:
            prefix = header[345:500].split(b"\0", 1)[0]
            base = header[0:100].split(b"\0", 1)[0]
            member = (prefix + b"/" + base if prefix else base).decode("utf-8")
        if kind not in (b"L", b"x") and keep is not None and not keep(member):
            long_name = None
            _skip(stream, padded, name)
            yield member, None
            continue
        data = bytearray(size)  # writable: the loader wraps arrays around it without a copy
        if stream.readinto(data) < size:
            raise ShardError(f"{name}: truncated tar (member cut short)")
        stream.read(padded - size)
        if kind in (b"L", b"x"):  # GNU long name / pax header: they name the next member
            long_name = bytes(data).rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(bytes(data))
            continue
        long_name = None
        yield member, data


def iter_tar_samples(
    stream: IO[bytes], name: str = "<stream>", keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytearray]]]:
    """(key, {member suffix: bytes}) for each WebDataset sample of a tar stream, in file order.

    With `keep`, the members of samples whose key it rejects are skipped unread: such a sample
    comes as (key, {}).
    """
    keep_member = None if keep is None else (lambda member: keep(sample_key(member)[0]))
    key: str | None = None
    sample: dict[str, bytearray] = {}
    for member, data in iter_tar_members(stream, name, keep_member):
        k, suffix = sample_key(member)
        if k != key:
            if key is not None:
                yield key, sample
            key, sample = k, {}
        if data is not None:
            sample[suffix] = data
    if key is not None:
        yield key, sample


class TaskShardWriter:
    """Numbered task shards with at most `shard_size` samples; each tar is renamed into place when full."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._rows: list[dict[str, Any]] = []

    def write(self, key: str, members: dict[str, bytes], row: dict[str, Any]) -> None:
        """Add one sample (members named `key.suffix`) and its parquet index row."""
        if self._tar is None:
            name = f"task-{len(self.shards):06d}.tar"
            self.shards.append(name)
            self._tmp = temp_path(self.out / name)
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: reruns give identical bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._rows.append({"image_id": key, "shard": self.shards[-1], **row})
        if len(self._rows) >= self.shard_size:
            self.close()

    def close(self) -> None:
        """Finish the open shard: rename the tar into place, then write its parquet index."""
        if self._tar is None:
            return
        self._tar.close()
        name = self.shards[-1]
        publish(self._tmp, self.out / name)
        atomic_write_table(self.out / name.replace(".tar", ".parquet"), pa.Table.from_pylist(self._rows))
        self._tar, self._tmp, self._rows = None, None, []


# ----------------------------------------------------------------------------- feature set


@dataclass
class FeatureSet:
    """What the shard job needs from a feature set: its description and the ok images' ids and sources."""

    root: Path
    info: dict[str, Any]
    sha256: str
    shards: list[str]
    images: list[tuple[str, str | None]]

    @property
    def feature_dim(self) -> int:
        """Region feature size D."""
        return int(self.info["feature_dim"])


def open_feature_set(root: str | Path) -> FeatureSet:
    """Read `dataset.json` and the per-shard parquet indexes (ids and sources of the ok images)."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise ShardError(f"{root}: not a feature set (no dataset.json); run `vilbert-data extract` first")
    raw = meta_path.read_bytes()
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ShardError(f"{meta_path}: not valid JSON: {exc}") from exc
    missing = [k for k in ("feature_layer", "feature_dim", "shards") if k not in info]
    if info.get("format") != "vilbert-data/features" or missing:
        raise ShardError(
            f"{meta_path}: not a vilbert-data feature set description (missing {missing or 'format'})"
        )
    images: list[tuple[str, str | None]] = []
    for shard in info["shards"]:
        if not (root / shard).is_file():
            raise ShardError(f"{root / shard}: feature shard listed in dataset.json is missing")
        index = root / shard.replace(".tar", ".parquet")
        if index.is_file():
            table = pq.read_table(index, columns=["image_id", "source", "status"]).to_pylist()
            images.extend((r["image_id"], r["source"]) for r in table if r["status"] == "ok")
        else:  # no index: list the tar's keys (headers only, features skipped)
            log.warning("%s: no parquet index, listing the tar instead", index)
            with open(root / shard, "rb") as f:
                keys = iter_tar_samples(f, str(root / shard), keep=lambda _key: False)
                images.extend((key, None) for key, _ in keys)
    return FeatureSet(root, info, hashlib.sha256(raw).hexdigest(), list(info["shards"]), images)


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
    fs = open_feature_set(features)
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
            raise ShardError(f"{disk_full_error(out, 'the task shards')}; free space and rerun the same command") from None
        raise ShardError(f"{err.filename or out}: {err.strerror or err}") from None


def _write_task_dir(
    fs: FeatureSet, spec: DataTask, anns: list[Annotation], annotations: Sequence[str | Path], split: str, out: Path,
    shard_size: int, answers: list[str] | None, min_answer_count: int, weights: str | Path | None, device: str,
    detector_config: Any, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """The body of run_shard once its inputs are checked: write the shards, the report and task.json."""
    for stale in [out / "task.json", out / STATS_FILE, *out.glob("task-*.tar"), *out.glob("task-*.parquet")]:
        stale.unlink(missing_ok=True)  # a previous run: task.json first, so the folder reads as incomplete
    remove_stale_temps(out)  # half-written shards of a killed run
    report = out / "report"
    report.mkdir(exist_ok=True)

    task = spec.name
    by_image, missing = join_annotations(anns, ImageMatcher(fs.images))
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
    bar = progress_bar(len(fs.images), f"shard {task}/{split}", "img", progress)
    for shard in fs.shards:
        with open(fs.root / shard, "rb") as f:
            # Images without annotations in this split are skipped unread (their sample is empty).
            for key, sample in iter_tar_samples(f, str(fs.root / shard), keep=by_image.__contains__):
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


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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
    regions = [feats] + ([load_npy(members["gt_features.npy"])] if "gt_features.npy" in members else [])
    return members, {"num_boxes": int(feats.shape[0]), "num_records": len(records)}, regions
