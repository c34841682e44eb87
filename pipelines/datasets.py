"""Training datasets over task shards: one IterableDataset for every task, and padded batches.

`TaskDataset` streams task shards (docs/contracts.md section 3) and yields padded batches (section 4):

* shards come from a TASKDIR, a list of paths, a brace pattern (`task-{000000..000009}.tar`) or URLs
  (anything `webdataset.gopen` opens: local, http(s), `pipe:`);
* shards are split by node (torch.distributed rank/world size, else RANK/WORLD_SIZE) and then by
  DataLoader worker: disjoint and, together, complete;
* `even_split=True` (training under DDP) splits each epoch by records instead, from the shards'
  parquet indexes: every rank reads the same number of records, each record once per epoch (a few
  twice, as DistributedSampler pads), whatever the number and sizes of the shards;
* for multi-rank runs, `resampled=True` draws shards with replacement and every rank yields exactly
  `steps` batches per epoch, so DDP ranks never wait on each other;
* each image sample expands into the task's examples (a caption, a question, a sentence, two VCR
  stages), which pass through a seeded shuffle buffer and are batched inside the worker.

Regions: the global [IMG] region first (mean of all the image's region features, spatial
[0, 0, 1, 1, 1], zero class target), then at most `max_regions` detected regions in file order.

`swap_images=True` (tasks whose spec in `pipelines.tasks` defines a swap: VQA, VCR, RefCOCO, ...)
gives every image's records the regions of another image of the same stream (a cyclic shift by one
image): the vision-use diagnostic of `eval` and of training validation. A model that answers as well
with another image's regions does not use the image.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from extract.config import CLS_PROB_DIM, MAX_BOXES
from pipelines.formats.npy import load_npy
from pipelines.formats.tar import iter_tar_samples, read_tar_samples
from pipelines.formats.tasks import is_url, read_shard_index, read_task_json, task_shards
from pipelines.formats.tasks import num_answers as formats_num_answers
from pipelines.tasks import data_task, data_tasks
from pipelines.tokenization import MAX_TEXT_LEN, TextTokenizer

GLOBAL_SPATIAL = np.array([0.0, 0.0, 1.0, 1.0, 1.0], np.float32)


# ----------------------------------------------------------------------------- shard lists


def expand_urls(urls_or_dir: str | Path | Sequence[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """Shard URLs (in task.json order within each TASKDIR) and the `task.json` of every TASKDIR given."""
    import braceexpand

    items = [urls_or_dir] if isinstance(urls_or_dir, str | Path) else list(urls_or_dir)
    urls: list[str] = []
    infos: list[dict[str, Any]] = []
    for item in items:
        text = str(item)
        path = Path(text)
        if not is_url(text) and path.is_dir():
            info = read_task_json(path)
            info["_dir"] = str(path)
            infos.append(info)
            urls.extend(map(str, task_shards(path, info)))
        else:
            urls.extend(braceexpand.braceexpand(text))
    if not urls:
        raise ValueError(f"no task shards found in {urls_or_dir!r}")
    return urls, infos


def node_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker, (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def split_shards(urls: Sequence[str], rank: int, world: int, worker: int, workers: int) -> list[str]:
    """Shards of one (rank, worker): by rank first, then by worker; disjoint and complete over all pairs."""
    return list(urls)[rank::world][worker::workers]


def even_record_pieces(
    shard_records: Sequence[int], rank: int, world: int, worker: int = 0, workers: int = 1
) -> list[tuple[int, int, int]]:
    """(shard index, first record, end record) pieces of one (rank, worker)'s equal share of an epoch.

    Records are numbered in shard order. Each rank takes ceil(N / world) consecutive records, the last
    ranks wrapping around to the first records when N does not divide (the padding DistributedSampler
    does), so every record is read once (a few twice) and every rank reads as many; a rank's workers
    then split its share into consecutive parts.
    """
    total = sum(shard_records)
    if total == 0:
        return []
    per_rank = -(-total // world)
    base, extra = divmod(per_rank, workers)
    pos = rank * per_rank + worker * base + min(worker, extra)
    remaining = base + (1 if worker < extra else 0)
    starts = [0]
    for n in shard_records[:-1]:
        starts.append(starts[-1] + n)
    pieces = []
    while remaining > 0:
        at = pos % total
        shard = bisect.bisect_right(starts, at) - 1  # the last shard starting at or before `at` (skips empty ones)
        lo = at - starts[shard]
        hi = min(shard_records[shard], lo + remaining)
        pieces.append((shard, lo, hi))
        remaining -= hi - lo
        pos += hi - lo
    return pieces


def batches_for_worker(steps: int, worker: int, workers: int) -> int:
    """This worker's share of `steps` batches, so the workers of a rank yield exactly `steps` in total."""
    return steps // workers + (1 if worker < steps % workers else 0)


# ----------------------------------------------------------------------------- decoding


@dataclass
class Regions:
    """One image's regions: the kept regions as stored (float16 or float32) and the [IMG] feature.

    `feat`, `loc`, `target` give the model-ready float32 arrays with [IMG] first, (R,D), (R,5),
    (R,1601). `collate` reads the stored arrays directly and converts while filling the batch, so
    that every array is copied once.
    """

    raw_feat: np.ndarray  # (k,D) kept detected (and VCR ground-truth) regions, as stored
    raw_loc: np.ndarray  # (k,5)
    raw_target: np.ndarray  # (k,C) detector class distributions, as stored
    raw_global: np.ndarray | None = None  # (D,) mean of ALL regions when some were cut; else computed

    @property
    def num_regions(self) -> int:
        """Regions in the model's sequence R: [IMG] + kept regions."""
        return self.raw_feat.shape[0] + 1

    @property
    def num_detected(self) -> int:
        """Kept regions after [IMG]."""
        return self.raw_feat.shape[0]

    @property
    def global_feat(self) -> np.ndarray:
        """(D,) float32 [IMG] feature: the mean of all the image's region features."""
        if self.raw_global is not None:
            return self.raw_global
        return self.raw_feat.mean(axis=0, dtype=np.float32)

    @property
    def feat(self) -> np.ndarray:
        """(R,D) float32 features, [IMG] first."""
        return np.concatenate([self.global_feat[None], self.raw_feat.astype(np.float32)])

    @property
    def loc(self) -> np.ndarray:
        """(R,5) float32 spatial vectors, [IMG] = [0, 0, 1, 1, 1] first."""
        return np.concatenate([GLOBAL_SPATIAL[None], self.raw_loc.astype(np.float32)])

    @property
    def target(self) -> np.ndarray:
        """(R,C) float32 class distributions, zeros for [IMG]."""
        return np.concatenate(
            [np.zeros((1, self.raw_target.shape[1]), np.float32), self.raw_target.astype(np.float32)]
        )


def _donated(own: Regions, donor: Regions, features_only: bool) -> Regions:
    """`donor`'s regions in place of `own`; features_only keeps own's boxes (and so their IoUs)."""
    if not features_only:
        return donor
    if donor.num_detected == 0:  # nothing to give: no appearance at all
        return Regions(np.zeros_like(own.raw_feat), own.raw_loc, own.raw_target)
    # the donor's appearance features on own's boxes, repeated when the donor has fewer regions
    take = np.arange(own.num_detected) % donor.num_detected
    return Regions(donor.raw_feat[take], own.raw_loc, own.raw_target)


def swap_regions(
    items: Iterator[tuple[str, list[dict], Regions]], features_only: bool = False
) -> Iterator[tuple[str, list[dict], Regions]]:
    """Each (key, records, regions) with the regions of the item before it; the first gets the last's.

    A cyclic shift by one: no image keeps its own regions (a lone image is dropped: there is no other
    image to give it). Memory: the first image's regions are held until the end.
    """
    first = prev = None
    for item in items:
        if first is None:
            first = item
        else:
            yield item[0], item[1], _donated(item[2], prev[2], features_only)
        prev = item
    if first is not None and prev is not first:
        yield first[0], first[1], _donated(first[2], prev[2], features_only)


def build_regions(sample: dict[str, bytes], max_regions: int, with_gt: bool = False) -> Regions:
    """Regions of a task sample: up to `max_regions` in file order (ground-truth boxes first for VCR)."""
    feat = load_npy(sample["features.npy"])  # (K,D)
    loc = load_npy(sample["spatial.npy"])  # (K,5)
    prob = load_npy(sample["cls_prob.npy"])  # (K,1601)
    if with_gt and "gt_features.npy" in sample:
        feat = np.concatenate([load_npy(sample["gt_features.npy"]), feat])
        loc = np.concatenate([load_npy(sample["gt_spatial.npy"]), loc])
        prob = np.concatenate([load_npy(sample["gt_cls_prob.npy"]), prob])
    k = min(feat.shape[0], max_regions)
    g = None
    if k == 0 or k < feat.shape[0]:  # else collate takes the mean of the float32 copy, which is faster
        g = feat.mean(axis=0, dtype=np.float32) if feat.shape[0] else np.zeros(feat.shape[1], np.float32)
    if prob.ndim != 2:
        prob = prob.reshape(feat.shape[0], CLS_PROB_DIM)
    return Regions(feat[:k], loc[:k], prob[:k], g)


# ----------------------------------------------------------------------------- collation


def _pad_text(rows: Sequence[tuple[list[int], list[int]]], length: int) -> tuple[np.ndarray, ...]:
    """(ids, segments, mask) int64 arrays (N,length) for a list of encoded texts."""
    ids = np.zeros((len(rows), length), np.int64)
    seg = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, (tok, typ) in enumerate(rows):
        ids[i, : len(tok)] = tok
        seg[i, : len(typ)] = typ
        mask[i, : len(tok)] = 1
    return ids, seg, mask


def _batch_zeros(*shape: int) -> torch.Tensor:
    """Float32 zeros for a batch tensor; inside a DataLoader worker, allocated in shared memory.

    A worker hands tensors to the main process through shared memory and first copies any tensor
    that is not there yet; allocating there up front (as torch's own default_collate does) saves
    that copy, about a quarter of the worker's time with 2048-d features.
    """
    if get_worker_info() is not None:
        try:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
            return torch.empty(0).set_(storage, 0, shape).zero_()
        except (AttributeError, RuntimeError):  # a torch without this internal: plain memory
            pass
    return torch.zeros(*shape)


def collate_texts(
    texts: Sequence[tuple[list[int], list[int]]], lead: tuple[int, ...], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """input_ids, token_type_ids, attention_mask of encoded texts, padded to the longest, shaped lead + (T,)."""
    t = max(len(ids) for ids, _ in texts)
    ids, seg, mask = _pad_text(texts, t)
    if pad_id:
        ids[mask == 0] = pad_id
    shape = (*lead, t)
    return {
        "input_ids": torch.from_numpy(ids.reshape(shape)),
        "token_type_ids": torch.from_numpy(seg.reshape(shape)),
        "attention_mask": torch.from_numpy(mask.reshape(shape)),
    }


def collate_regions(regions: Sequence[Regions], lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """image_feat, image_loc, image_mask, image_target of images' regions, [IMG] first, padded, shaped lead + (R, ...)."""
    r_max = max(r.num_regions for r in regions)
    d = regions[0].raw_feat.shape[1]
    n_cls = regions[0].raw_target.shape[1]
    # torch copies convert float16 -> float32 about 3x faster than numpy assignment.
    feat = _batch_zeros(len(regions), r_max, d)
    loc = torch.zeros(len(regions), r_max, 5)
    target = _batch_zeros(len(regions), r_max, n_cls)  # row 0 ([IMG]) stays zero
    img_mask = torch.zeros(len(regions), r_max, dtype=torch.long)
    global_loc = torch.from_numpy(GLOBAL_SPATIAL)
    for i, r in enumerate(regions):
        n = r.num_regions
        feat[i, 1:n].copy_(torch.from_numpy(r.raw_feat))
        if r.raw_global is None:
            feat[i, 0] = feat[i, 1:n].mean(0)
        else:
            feat[i, 0] = torch.from_numpy(r.raw_global)
        loc[i, 0] = global_loc
        loc[i, 1:n].copy_(torch.from_numpy(r.raw_loc))
        target[i, 1:n].copy_(torch.from_numpy(r.raw_target))
        img_mask[i, :n] = 1
    return {
        "image_feat": feat.view(*lead, r_max, d),
        "image_loc": loc.view(*lead, r_max, 5),
        "image_mask": img_mask.view(*lead, r_max),
        "image_target": target.view(*lead, r_max, n_cls),
    }


def collate(examples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Pad a list of examples into the batch dict of docs/contracts.md section 4."""
    first = examples[0]
    b = len(examples)
    # Text: every example holds a list of C encoded texts (C = 1, or 4 for VCR / retrieval).
    c = len(first["texts"])
    lead = (b,) if c == 1 and not first.get("multi_choice") else (b, c)
    batch: dict[str, Any] = collate_texts([tt for ex in examples for tt in ex["texts"]], lead, pad_id)
    # Images: each example holds a list of Regions (1, or C for retrieval).
    n_img = len(first["regions"])
    batch.update(collate_regions([r for ex in examples for r in ex["regions"]], (b, n_img) if n_img > 1 else (b,)))
    batch["image_id"] = [ex["image_id"] for ex in examples]
    data_task(first["task"]).collate(examples, batch)
    return batch


# ----------------------------------------------------------------------------- the dataset


class TaskDataset(IterableDataset):
    """Padded batches (or single examples when `batch_size` is None) of one task from task shards."""

    def __init__(
        self,
        urls_or_dir: str | Path | Sequence[str | Path],
        task: str,
        tokenizer: TextTokenizer | str | Path,
        batch_size: int | None = 32,
        max_text_len: int = MAX_TEXT_LEN,
        max_regions: int = MAX_BOXES,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        steps: int | None = None,
        num_answers: int | None = None,
        feature_dim: int | None = None,
        negative_buffer: int = 256,
        drop_last: bool = False,
        swap_images: bool = False,
        even_split: bool = False,
        keep: dict[str, Any] | None = None,
    ) -> None:
        self.spec = data_task(task)  # ValueError naming the tasks for an unknown one
        # only the examples whose fields have these values (a training task that reads part of a shard
        # task's examples: VCR's Q->A or QA->R stage alone)
        self.keep = dict(keep or {})
        if swap_images and self.spec.swap is None:
            swappable = [name for name, t in data_tasks().items() if t.swap]
            raise ValueError(f"swap_images is defined for {', '.join(swappable)}, not {task!r}")
        self.swap_images = swap_images
        if resampled and not steps:
            raise ValueError("resampled shards need steps (batches per rank per epoch)")
        self.urls, infos = expand_urls(urls_or_dir)
        self.task = task
        if not isinstance(tokenizer, TextTokenizer):
            tokenizer = TextTokenizer.from_pretrained(tokenizer, max_len=max_text_len)
        elif tokenizer.max_len != max_text_len:
            tokenizer = TextTokenizer(tokenizer.tokenizer, max_len=max_text_len)
        self.tokenizer = tokenizer
        self.batch_size, self.max_regions = batch_size, max_regions
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.resampled, self.steps = resampled, steps
        self.negative_buffer, self.drop_last = negative_buffer, drop_last
        self.epoch = 0
        self.feature_dim, self._dim_source = feature_dim, "the feature_dim argument" if feature_dim else None
        for info in infos:
            if info.get("task") not in (None, task):
                raise ValueError(f"{info['_dir']}: task shards of task {info['task']!r}, not {task!r}")
            dim = info.get("features", {}).get("feature_dim")
            if dim is None:
                continue
            if self.feature_dim is None:
                self.feature_dim, self._dim_source = int(dim), f"{info['_dir']}/task.json"
            elif int(dim) != self.feature_dim:
                raise ValueError(
                    f"{info['_dir']}/task.json: {dim}-d features ({info['features'].get('feature_layer')}) but "
                    f"{self._dim_source} says {self.feature_dim}-d; feature sets of different layers cannot be mixed"
                )
        self.num_answers = num_answers
        if self.spec.answer_vocab and num_answers is None:
            self.num_answers = next(filter(None, (formats_num_answers(i["_dir"], i) for i in infos)), None)
            if self.num_answers is None:
                raise ValueError(f"{task} needs num_answers (or a TASKDIR whose task.json names its answers.json)")
        # even_split (training under DDP): ranks split each epoch by records, using the shards' indexes
        self.even_split = even_split and not resampled
        self.shard_images = [read_shard_index(u) for u in self.urls] if self.even_split else []

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffling for a new epoch (call before iterating the DataLoader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per rank per epoch; only defined for resampled datasets."""
        if not self.steps:
            raise TypeError(
                "the length of a non-resampled TaskDataset is unknown; pass resampled=True, steps=N"
            )
        return self.steps

    # -- shards ------------------------------------------------------------------------

    def shard_stream(self, rank: int, world: int, worker: int, workers: int) -> Iterator[str]:
        """The shard URLs this (rank, worker) reads, in order (finite, or endless when resampled)."""
        if self.resampled:
            rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")
            while True:
                yield rng.choice(self.urls)
        # The same shuffled order on every rank and worker, so that the split stays disjoint.
        urls = list(self.urls)
        random.Random(f"{self.seed}/{self.epoch}").shuffle(urls)
        yield from split_shards(urls, rank, world, worker, workers)

    def samples(self, urls: Iterator[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Task samples (key, members) of a stream of shard URLs."""
        import webdataset as wds

        for url in urls:
            with wds.gopen(url, "rb") as stream:
                yield from iter_tar_samples(stream, url)

    def even_samples(
        self, rank: int, world: int, worker: int, workers: int
    ) -> Iterator[tuple[str, dict[str, bytes], tuple[int, int]]]:
        """(key, members, (first, end) of its records) of this (rank, worker)'s equal share of the epoch.

        The shards are taken in the epoch's shuffled order (the same on every rank); see even_record_pieces.
        """
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        counts = [sum(n for _, n in self.shard_images[i]) for i in order]
        for k, lo, hi in even_record_pieces(counts, rank, world, worker, workers):
            wanted: dict[str, tuple[int, int]] = {}
            start = 0
            for image_id, n in self.shard_images[order[k]]:
                a, b = max(lo, start), min(hi, start + n)
                if a < b:
                    wanted[image_id] = (a - start, b - start)
                start += n
            for key, sample in read_tar_samples(self.urls[order[k]], keep=wanted.__contains__):
                if key in wanted:
                    yield key, sample, wanted[key]

    # -- examples ----------------------------------------------------------------------

    def _check_dim(self, url_key: str, regions: Regions) -> None:
        """Fail clearly when a sample's feature size differs from the expected one."""
        d = regions.raw_feat.shape[1]
        if self.feature_dim is None:
            self.feature_dim, self._dim_source = d, f"the first sample read ({url_key})"
        elif d != self.feature_dim:
            raise ValueError(
                f"sample {url_key} has {d}-d region features but {self._dim_source} says {self.feature_dim}-d; "
                "feature sets of different layers (res4 1024-d, res5 2048-d) cannot be mixed"
            )

    def examples(self, samples: Iterator[tuple], rng: random.Random) -> Iterator[dict]:
        """Expand image samples into the task's examples (captions, questions, sentences, VCR stages)."""
        items = self._decoded(samples)
        if self.swap_images:
            items = swap_regions(items, features_only=self.spec.swap == "features")
        examples = self.spec.examples(self, items, rng)
        if self.keep:
            examples = (ex for ex in examples if all(ex.get(k) == v for k, v in self.keep.items()))
        yield from examples

    def images(self) -> Iterator[tuple[str, list[dict], Regions]]:
        """(key, records, regions) of every image in shard order, in this process, D checked (whole-set evaluation)."""
        return self._decoded(self.samples(iter(self.urls)))

    def _decoded(self, samples: Iterator[tuple]) -> Iterator[tuple[str, list[dict], Regions]]:
        """(key, records, regions) of each (key, members[, (first, end) record range]) sample, D checked."""
        for key, sample, *part in samples:
            regions = self.spec.regions(sample, self.max_regions)
            self._check_dim(key, regions)
            records = json.loads(sample["ann.json"])
            if part:
                records = records[part[0][0] : part[0][1]]
            yield key, records, regions

    def shuffled(self, items: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """Seeded shuffle buffer of up to `shuffle_buffer` examples.

        Yields start once the buffer holds 64 examples; it then grows to its full size (about one
        yield per two reads), so the first batch does not wait for a full buffer.
        """
        size = self.shuffle_buffer
        if size <= 1:
            yield from items
            return
        initial = min(size, 64)
        buf: list[dict] = []
        for item in items:
            buf.append(item)
            if len(buf) < initial or (len(buf) < size and rng.random() < 0.5):
                continue
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        """Batches (or examples) for this rank and worker."""
        rank, world = node_info()
        worker, workers = worker_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}/examples")
        if self.even_split and world > 1:
            samples: Iterator[tuple] = self.even_samples(rank, world, worker, workers)
        else:
            samples = self.samples(self.shard_stream(rank, world, worker, workers))
        stream = self.shuffled(self.examples(samples, rng), rng)
        if self.batch_size is None:
            yield from stream
            return
        quota = batches_for_worker(self.steps, worker, workers) if self.resampled else None
        if quota == 0:
            return
        n = 0
        batch: list[dict] = []
        for ex in stream:
            batch.append(ex)
            if len(batch) == self.batch_size:
                yield collate(batch, self.tokenizer.pad_id)
                batch, n = [], n + 1
                if quota is not None and n >= quota:
                    return
        if batch and not self.drop_last:
            yield collate(batch, self.tokenizer.pad_id)


def make_loader(
    urls_or_dir: str | Path | Sequence[str | Path],
    task: str,
    tokenizer: TextTokenizer | str | Path,
    batch_size: int = 32,
    *,
    num_workers: int = 2,
    **dataset_kwargs: Any,
) -> DataLoader:
    """DataLoader of padded batches from task shards (batching happens in the workers).

    `dataset_kwargs` are `TaskDataset`'s options (max_text_len, shuffle_buffer, seed, resampled, ...),
    with its defaults.
    """
    ds = TaskDataset(urls_or_dir, task, tokenizer, batch_size=batch_size, **dataset_kwargs)
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
