"""vilbert-data: images -> region features -> task shards -> ViLBERT training -> evaluation.

A thin typer app: each command parses its options and calls one library function, so tests and
users can call the same functions from Python. Heavy imports (torch, ray) happen inside the
commands so that `--help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import typer

from extract.config import DetectorConfig  # the detector's defaults are the extract command's
from extract.devices import PRECISIONS

app = typer.Typer(
    name="vilbert-data",
    help=(
        "From a folder of images to a trained and evaluated ViLBERT.\n\n"
        "Steps: extract (region features) -> shard (join with annotations) -> train -> eval.\n\n"
        "Example: vilbert-data extract --images photos/ --out feats/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


# one definition of the option every long-running command takes, so that name and help stay the same
_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show the progress bar.")
EXIT_BAD_INPUT = 2  # shard, train, eval: a bad argument or input, said in one line
EXIT_JOB_FAILED = 1  # the inputs were fine but the job could not finish: a full disk, a diverged run


def _task_names(package: str) -> str:
    """A task registry's names for help texts ("a, b or c"), from its module files: nothing heavy is imported."""
    from importlib.util import find_spec

    from pipelines.tasks import task_modules

    top, _, sub = package.partition(".")
    names = task_modules(Path(next(iter(find_spec(top).submodule_search_locations))) / sub)
    return ", ".join(names[:-1]) + " or " + names[-1]


def _literal(text: str) -> str:
    """Help text shown as written: Rich would take "[task default]" for a markup tag and drop it."""
    return text.replace("[", "\\[")


def _fail(err: BaseException) -> NoReturn:
    """Stop with one line `error: ...` (a library message may wrap lines) and its exit status.

    2 for a bad argument or input; 1 when the job could not finish (a full disk, a loss that became
    NaN), as `extract` does.
    """
    from pipelines.fileio import DiskFullError
    from vilbert_core.training.args import TrainingDiverged

    typer.echo("error: " + " ".join(str(err).split()), err=True)
    failed = isinstance(err, DiskFullError | TrainingDiverged)
    raise typer.Exit(EXIT_JOB_FAILED if failed else EXIT_BAD_INPUT) from err


def _version_callback(value: bool) -> None:
    """Print the installed version and exit."""
    if value:
        try:
            typer.echo(f"vilbert-data {version('vilbert-data')}")
        except PackageNotFoundError:
            typer.echo("vilbert-data (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    version_: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """vilbert-data command-line interface."""


def _run_feature_job(job: Callable[[], Any]) -> Any:
    """Run an extract/convert job; its failures become one line and the documented exit status."""
    from pipelines.distributor import ExtractJobError
    from pipelines.extract_job import EXIT_BAD_INPUT, EXIT_JOB_FAILED

    try:
        return job()
    except ExtractJobError as err:
        typer.echo(f"error: the job could not finish: {err}", err=True)
        raise typer.Exit(EXIT_JOB_FAILED) from err
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from err
    except Exception as err:  # Ray or the filesystem broke: still a message and the documented status
        typer.echo(f"error: the job could not finish: {type(err).__name__}: {err}", err=True)
        raise typer.Exit(EXIT_JOB_FAILED) from err


# ---------------------------------------------------------------- extract (owner: pipelines/extract)
# COMMAND: extract
@app.command("extract")
def extract_cmd(
    images: str = typer.Option(
        ..., "--images", help="Folder (recursive), fsspec URL (s3://, gs://, file://) or .txt/.parquet list."
    ),
    out: str = typer.Option(..., "--out", help="Output folder for the feature shards and dataset.json."),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Detector checkpoint (.pth/.bin/.pkl). Omitted: RANDOM weights, previews only.",
    ),
    feature_layer: str = typer.Option(
        DetectorConfig.feature_layer, "--feature-layer", help="res4 (1024-d) or res5 (2048-d)."
    ),
    min_boxes: int = typer.Option(DetectorConfig.min_boxes, "--min-boxes", help="Fewest regions kept per image."),
    max_boxes: int = typer.Option(DetectorConfig.max_boxes, "--max-boxes", help="Most regions kept per image."),
    conf_thresh: float = typer.Option(
        DetectorConfig.conf_thresh, "--conf-thresh", help="Keep regions whose best class score is above."
    ),
    min_size: int = typer.Option(DetectorConfig.min_size, "--min-size", help="Short side of the detector input."),
    max_size: int = typer.Option(
        DetectorConfig.max_size, "--max-size", help="Cap on the long side of the detector input."
    ),
    dtype: str = typer.Option("float16", "--dtype", help="Storage of features/cls_prob: float16 or float32."),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="Images of one input size per detector forward pass. Default: 1 on CPUs, 4 on GPUs.",
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Detector actors. Default: one per GPU, or one CPU worker using every core."
    ),
    gpus_per_worker: float | None = typer.Option(
        None,
        "--gpus-per-worker",
        help="GPUs per actor (fractions share a GPU). Default: 1 if the cluster has GPUs.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    shard_size: int = typer.Option(256, "--shard-size", help="Images per output shard (the unit of resume)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (else RAY_ADDRESS, else an embedded local Ray)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete an existing feature set in OUT and start again."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N images (sorted)."),
    depth: int = typer.Option(
        DetectorConfig.depth, "--depth", help="ResNet depth, 101 or 50 (50 + random weights: fast preview)."
    ),
    max_proposals: int | None = typer.Option(
        None,
        "--max-proposals",
        help=f"RPN proposals kept after NMS (default {DetectorConfig.post_nms_topk}); fewer is faster.",
    ),
    precision: str = typer.Option(
        "fp32", "--precision", help="fp32, or mixed precision in the detector: bf16 (CPU/GPU) or fp16 (GPU)."
    ),
    autocast: str | None = typer.Option(None, "--autocast", hidden=True, help="The old name of --precision."),
    progress: bool = _PROGRESS,
) -> None:
    """Extract bottom-up-attention region features of every image into WebDataset shards.

    Resumable: rerun the same command after a crash and only unfinished shards are redone.
    Exit status: 0 all images ok; 3 finished but some images failed (reasons in the parquet index and
    `vilbert-data inspect`); 1 the job could not finish (also: another job holds OUT, disk full);
    2 bad arguments, input, --out, --ray-address or device (checked before Ray starts).

    Example: vilbert-data extract --images photos/ --out feats/ --weights bua-caffe-frcn-r101-k10-100.pth

    Fast random-weight preview on a laptop CPU:
    vilbert-data extract --images photos/ --out feats/ --depth 50 --min-size 256 --max-size 384 --max-proposals 10
    """
    from extract.devices import autocast_setting
    from pipelines.extract_job import (
        ExtractOptions,
        format_summary,
        run_extract,
    )

    options = ExtractOptions(
        weights=weights,
        feature_layer=feature_layer,
        min_boxes=min_boxes,
        max_boxes=max_boxes,
        conf_thresh=conf_thresh,
        min_size=min_size,
        max_size=max_size,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        device=device,
        shard_size=shard_size,
        ray_address=ray_address,
        overwrite=overwrite,
        limit=limit,
        depth=depth,
        max_proposals=max_proposals,
        autocast=autocast_setting(autocast or precision),
        progress=progress,
    )
    result = _run_feature_job(lambda: run_extract(images, out, options))
    typer.echo(format_summary(result.dataset))
    typer.echo(f"wrote {out}/dataset.json")
    raise typer.Exit(result.exit_code)


# ---------------------------------------------------------------- inspect (owner: pipelines/extract)
# COMMAND: inspect
@app.command("inspect")
def inspect_cmd(
    features: str = typer.Argument(
        ..., metavar="FEATURES", help="A feature set folder written by `vilbert-data extract` or `convert`."
    ),
    image_id: str | None = typer.Option(
        None, "--image-id", help="Show this image's boxes (default: first ok one)."
    ),
    picture: str | None = typer.Option(
        None, "--out", help="Write a PNG of the image with its labelled boxes."
    ),
    vocab: list[str] | None = typer.Option(
        None,
        "--vocab",
        help="Visual Genome vocabulary: a folder with vg_objects_vocab.txt / vg_attributes_vocab.txt, or the "
        "files (repeat the option). Without it, boxes are labelled with ids.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summary of a feature set (counts, boxes-per-image histogram, failures by reason) and a picture.

    Example: vilbert-data inspect feats/ --out dog.png --image-id photos_dog --vocab ~/vg/
    """
    import json

    from pipelines.inspect import (
        format_boxes,
        format_summary,
        load_sample,
        load_vocabs,
        render_picture,
        summarize,
    )

    try:
        summary = summarize(features)
        typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
        if image_id is not None or picture is not None:
            objects, attributes = load_vocabs(vocab or [])
            typer.echo(format_boxes(load_sample(features, image_id), objects, attributes))
        if picture is not None:
            typer.echo(f"wrote {render_picture(features, picture, image_id, vocab)}")
    except (FileNotFoundError, KeyError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


# ---------------------------------------------------------------- convert, export (owner: pipelines/convert)
# COMMAND: convert
@app.command("convert")
def convert_cmd(
    sources: list[str] = typer.Argument(
        ..., help="Released feature files or folders: TSV files, an LMDB folder, a folder of .npz/.npy."
    ),
    out: str = typer.Option(..., "--out", help="Output folder for the feature shards and dataset.json."),
    fmt: str = typer.Option(
        "auto",
        "--format",
        help="auto, butd-tsv, lxmert-tsv, vilbert-lmdb or npz-dir (auto: from path and content).",
    ),
    shard_size: int = typer.Option(
        256, "--shard-size", help="Images per output shard (TSV: about, cut by bytes); the unit of resume."
    ),
    dtype: str = typer.Option(
        "float32", "--dtype", help="Storage of features/cls_prob: float32 (the source's bits) or float16."
    ),
    workers: int | None = typer.Option(None, "--workers", help="Ray actors. Default: one per CPU."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (else RAY_ADDRESS, else an embedded local Ray)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing feature set in OUT first."),
    recompute_classes: bool = typer.Option(
        False,
        "--recompute-classes",
        help="Add class/attribute distributions with the detector's given-box mode (needs --weights, --images).",
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Detector checkpoint for --recompute-classes."
    ),
    images: str | None = typer.Option(
        None, "--images", help="The original images (as for extract), for --recompute-classes."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (--recompute-classes)."),
    progress: bool = _PROGRESS,
) -> None:
    """Convert released region features into a feature set like extract's (shard/train/eval read it).

    Reads the bottom-up-attention TSV, LXMERT's TSV, vilbert's LMDB and per-image .npz/.npy. Streams
    (flat memory), runs on Ray, resumes after a crash. dataset.json says what the source lacked; a set
    without class distributions cannot be used for pretraining (masked region modelling) unless
    --recompute-classes adds them. Exit status as extract: 0 all ok, 3 some records failed, 1 the job
    could not finish, 2 bad arguments or input.

    Example: vilbert-data convert trainval_36/ --out feats/ --format butd-tsv
    """
    from pipelines.convert_job import ConvertOptions, format_source, run_convert
    from pipelines.extract_job import EXIT_BAD_INPUT, format_summary

    if recompute_classes and weights is None:
        typer.echo("error: --recompute-classes needs --weights (a detector checkpoint)", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    options = ConvertOptions(
        format=fmt,
        shard_size=shard_size,
        dtype=dtype,
        workers=workers,
        ray_address=ray_address,
        overwrite=overwrite,
        recompute_classes=recompute_classes,
        weights=weights,
        images=images,
        device=device,
        progress=progress,
    )
    result = _run_feature_job(lambda: run_convert(sources, out, options))
    typer.echo(format_summary(result.dataset))
    typer.echo(format_source(result.dataset))
    typer.echo(f"wrote {out}/dataset.json")
    raise typer.Exit(result.exit_code)


# COMMAND: export
@app.command("export")
def export_cmd(
    features: str = typer.Argument(..., help="A feature set folder (written by extract or convert)."),
    fmt: str = typer.Option(..., "--format", help="vilbert-lmdb (a folder) or butd-tsv (a file)."),
    out: str = typer.Option(..., "--out", help="The LMDB folder or TSV file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export at OUT."),
    any_feature_dim: bool = typer.Option(
        False, "--any-feature-dim",
        help="vilbert-lmdb: write features of another size than 2048 (vilbert-multi-task's reader assumes "
        "2048; for readers that take the size from the data).",
    ),
    progress: bool = _PROGRESS,
) -> None:
    """Write a feature set in a layout other trainers read (float32; cls_prob when the set has it).

    Example: vilbert-data export feats/ --format vilbert-lmdb --out coco_feats.lmdb
    """
    from pipelines.export_job import run_export

    try:
        summary = run_export(features, fmt, out, overwrite=overwrite, progress=progress, any_feature_dim=any_feature_dim)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(
        f"wrote {summary['images']} images ({summary['bytes'] / 1e6:.1f} MB) as {fmt} to {out} "
        f"in {summary['seconds']} s"
        + ("" if summary["with_cls_prob"] else " (no cls_prob: the set has none)")
    )


# ---------------------------------------------------------------- shard, vocab (owner: pipelines/shard)
# COMMAND: shard
@app.command("shard", context_settings={"allow_extra_args": True})
def shard_cmd(
    ctx: typer.Context,
    features: str = typer.Option(
        ..., "--features", help="Feature set folder written by `extract` (dataset.json)."
    ),
    task: str = typer.Option(..., "--task", help=_task_names("pipelines.tasks") + "."),
    annotations: list[str] = typer.Option(
        ...,
        "--annotations",
        help=(
            "Annotation file(s) in the layout of the task's public release (each task's: docs/shard.md); further "
            "files may follow the first one. E.g. captions: COCO captions .json, Conceptual Captions style .tsv or "
            ".jsonl; vqa: questions .json + annotations .json; refcoco: refs(unc).p + instances.json."
        ),
    ),
    split: str = typer.Option(
        ..., "--split", help="Split name (some tasks, e.g. refcoco and retrieval, select records by it)."
    ),
    out: str = typer.Option(..., "--out", help="Output TASKDIR (task shards, task.json, report/)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Images per task shard."),
    answers: str | None = typer.Option(
        None,
        "--answers",
        help="Tasks with an answer list (e.g. vqa): answers.json of the training TASKDIR to reuse (default: build "
        "from this split).",
    ),
    min_answer_count: int = typer.Option(
        9,
        "--min-answer-count",
        help="Tasks with an answer list: keep answers of at least this many questions (9 gives 3129 on VQA v2).",
    ),
    images: str | None = typer.Option(
        None, "--images", help="vcr: the vcr1images folder (images + metadata); visual7w_pointing, guesswhat_pointing: "
        "the images, for the candidate boxes."
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="vcr, visual7w_pointing, guesswhat_pointing: detector checkpoint for the given boxes (omitted: RANDOM "
        "weights).",
    ),
    device: str = typer.Option("auto", "--device", help="vcr, *_pointing: detector device, auto, cpu or cuda."),
    progress: bool = _PROGRESS,
) -> None:
    """Join region features with a task's annotations into task shards (one sample per image).

    Annotation image references (file name, path or COCO numeric id) are matched to the feature image ids (rule: docs/shard.md); annotations without features and images without annotations are counted here and listed in OUT/report/. A malformed annotation file stops with the file and the first bad record.

    Example: vilbert-data shard --features feats/ --task vqa --annotations v2_OpenEnded_mscoco_train2014_questions.json v2_mscoco_train2014_annotations.json --split train --out vqa_train/
    """
    from pipelines.fileio import DiskFullError
    from pipelines.shard_job import run_shard

    files = list(annotations) + [a for a in ctx.args]
    unknown = [a for a in files if a.startswith("-")]
    if unknown:
        raise typer.BadParameter(f"unknown option(s) {' '.join(unknown)}", param_hint="--annotations")
    try:
        info = run_shard(
            features, task, files, split, out, shard_size=shard_size, answers=answers,
            min_answer_count=min_answer_count, images=images, weights=weights, device=device, progress=progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, DiskFullError) as exc:  # AnnotationError, ShardError: bad inputs
        _fail(exc)
    c = info["counts"]
    typer.echo(
        f"{task}/{split}: {c['images']} images, {c['records']} records in {len(info['shards'])} shard(s) -> {out}\n"
        f"annotations without features: {c['annotations_without_features']} {c['missing_by_reason'] or ''}\n"
        f"images without annotations: {c['images_without_annotations']}; failed: {c['failed']}  (lists: {out}/report/)"
    )
    for warning in info.get("warnings", []):
        typer.secho(f"WARNING: {warning}", fg=typer.colors.YELLOW, err=True)


# COMMAND: vocab
@app.command("vocab")
def vocab_cmd(
    files: list[str] = typer.Argument(
        ..., help="Caption files: .txt (one per line), .tsv, .jsonl, COCO/Karpathy/VQA .json."
    ),
    out: str = typer.Option(..., "--out", help="Output folder for vocab.txt and tokenizer.json."),
    vocab_size: int = typer.Option(30522, "--vocab-size", help="Vocabulary size (BERT-base: 30522)."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Ignore pieces seen fewer times."),
) -> None:
    """Train an uncased WordPiece vocabulary from caption files (for machines without a BERT vocabulary).

    Special tokens come first: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.

    Example: vilbert-data vocab captions_train2014.json cc_train.tsv --out my_vocab/ --vocab-size 30522
    """
    from pipelines.annotations import AnnotationError
    from pipelines.tokenization import train_wordpiece

    try:
        path = train_wordpiece(files, out, vocab_size=vocab_size, min_frequency=min_frequency)
    except (AnnotationError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    n = sum(1 for _ in open(path, encoding="utf-8"))
    typer.echo(f"wrote {path} ({n} tokens) and {path.parent / 'tokenizer.json'}")


# ---------------------------------------------------------------- train (owner: vilbert_core/training)
# COMMAND: train
@app.command("train")
def train_cmd(
    task: str = typer.Option(
        ..., "--task", help=_task_names("vilbert_core.tasks") + "; several, comma-separated: multi-task training."
    ),
    data: list[str] = typer.Option(
        ..., "--data", help="Training TASKDIR written by `shard` (pretrain: captions shards), or shard URLs/brace "
        "pattern; multi-task: TASK=TASKDIR, once per task.",
    ),
    out: str = typer.Option(..., "--out", help="Run folder RUNDIR (model, checkpoints/, metrics.jsonl, curves.png)."),
    vocab: str = typer.Option(
        ..., "--vocab", help="WordPiece vocab.txt or tokenizer folder (e.g. from `vilbert-data vocab`)."
    ),
    val: list[str] | None = typer.Option(
        None, "--val", help="Validation TASKDIR: evaluated each epoch (or --eval-every); best model kept in RUNDIR/best/; "
        "multi-task: TASK=TASKDIR.",
    ),
    config: str = typer.Option(
        "vilbert-base", "--config", help="Model config: vilbert-base (the paper), tiny, or a config.json file."
    ),
    init_from: str | None = typer.Option(
        None, "--init-from", help="Start from a checkpoint: a RUNDIR/save_pretrained folder or a reference pytorch_model.bin."
    ),
    init_text_from: str | None = typer.Option(
        None, "--init-text-from", help="Hugging Face BERT folder to initialise the text stream from (as the paper)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help=_literal("Global batch per optimiser step, over all processes and accumulation [task default].")
    ),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches accumulated per optimiser step."),
    lr: float | None = typer.Option(None, "--lr", help=_literal("Peak learning rate [task default: paper].")),
    bert_lr_mult: float = typer.Option(
        0.1, "--bert-lr-mult", help="Learning-rate multiplier of the parameters loaded by --init-text-from."
    ),
    warmup: float = typer.Option(0.1, "--warmup", help="Linear warmup: a fraction of the steps (<1) or a step count."),
    epochs: float | None = typer.Option(None, "--epochs", help=_literal("Epochs [task default: paper]; ignored with --steps.")),
    steps: int | None = typer.Option(None, "--steps", help="Optimiser steps (overrides --epochs)."),
    max_text_len: int | None = typer.Option(
        None, "--max-text-len", help=_literal("Tokens per text, [CLS]/[SEP] included [task default: 36].")
    ),
    max_regions: int | None = typer.Option(
        None, "--max-regions", help=_literal("Detected regions per image (+1 global [IMG] region) [task default: 36].")
    ),
    feature_norm: str | None = typer.Option(
        None, "--feature-norm",
        help=_literal("standardize (region features minus the training mean, over the std, per dimension) or none (raw, "
                      "as the reference) [default: standardize for a new model; a checkpoint keeps its own]."),
    ),
    precision: str | None = typer.Option(
        None, "--precision",
        help=_literal(f"{', '.join(PRECISIONS)} (fp16: CUDA) [default: bf16 autocast on CUDA, fp32 on the CPU]."),
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in RUNDIR/checkpoints/."),
    seed: int = typer.Option(0, "--seed", help="Random seed (shuffling, masking, dropout, init)."),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader worker processes per rank."),
    resampled: bool = typer.Option(
        False, "--resampled",
        help="Draw shards with replacement, a fixed number of batches per rank (many nodes; needs no shard index). "
        "Without it, several processes split each epoch by records: every record once.",
    ),
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", help="Save a checkpoint every N steps (and at the end)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Newest checkpoints to keep (0: all)."),
    eval_every: int | None = typer.Option(None, "--eval-every", help=_literal("Validate every N steps [default: each epoch].")),
    clip_grad: float = typer.Option(
        1.0, "--clip-grad",
        help="Gradient-norm clipping threshold; 0: no clipping (then, in one process without --grad-accum, each "
        "update is applied as soon as backward has its gradient: same results, less memory).",
    ),
    threads: int | None = typer.Option(
        None, "--threads",
        help=_literal("torch threads per process [default: OMP_NUM_THREADS, else the process's cores (CPU affinity) "
                      "divided by the processes on the node, less --num-workers; at least 1]."),
    ),
    activation_checkpointing: bool = typer.Option(
        False, "--activation-checkpointing",
        help="Recompute each layer's activations in backward instead of storing them: less memory for long "
        "sequences or large batches, about a third more compute.",
    ),
    task_lr: list[str] | None = typer.Option(
        None, "--task-lr", help=_literal("Multi-task: TASK=LR, a task's peak learning rate [default: the task's paper lr].")
    ),
    task_batch_size: list[str] | None = typer.Option(
        None, "--task-batch-size", help=_literal("Multi-task: TASK=N, a task's global batch [default: --batch-size, else the task's].")
    ),
    task_iter_gap: list[str] | None = typer.Option(
        None, "--task-iter-gap", help=_literal("Multi-task, round-robin: TASK=N trains TASK in every Nth round [default: 1].")
    ),
    schedule: str = typer.Option(
        "round-robin", "--schedule", help="Multi-task: round-robin (task by task) or proportional (to the tasks' examples)."
    ),
    task_tokens: bool = typer.Option(
        False, "--task-tokens", help="Multi-task: a learned task embedding at [CLS] per task (12-in-1's task-specific tokens)."
    ),
    progress: bool = _PROGRESS,
) -> None:
    """Pretrain or fine-tune ViLBERT on task shards, on the CPU or on GPUs (torchrun for several).

    Tasks: pretrain (masked language + masked region modelling + alignment on captions shards) and the fine-tuning tasks (vqa, vcr, refcoco, retrieval, ...: docs/training.md). Batch, learning rate and epochs default to the paper's per task; AdamW (weight decay 0.01), linear warmup then linear decay, gradient clipping. Writes RUNDIR/config.json, model.safetensors, train_args.json, checkpoints/step-N/, metrics.jsonl, curves.png, and best/ with --val. A NaN loss stops the run and names the last good checkpoint; --resume continues a killed run exactly.

    Several processes (DDP; NCCL on GPUs, gloo on CPUs): torchrun --nproc_per_node 4 -m cli train ... ; --batch-size stays the global batch.

    Example: vilbert-data train --task vqa --data vqa_train/ --val vqa_val/ --vocab vocab/ --config tiny --batch-size 32 --lr 1e-4 --epochs 5 --out runs/vqa
    """
    from pipelines.fileio import DiskFullError
    from vilbert_core.training import TrainArgs, TrainingError, run_train

    multi = "," in task
    try:
        task_data = _task_values(data, "--data", str) if multi else None
        task_val = _task_values(val or [], "--val", str) if multi else None
        per_task = {option: _task_values(values or [], option, kind) for option, values, kind in (
            ("--task-lr", task_lr, float), ("--task-batch-size", task_batch_size, int),
            ("--task-iter-gap", task_iter_gap, int))}  # fmt: skip
    except ValueError as exc:
        _fail(exc)
    if not multi and (len(data) != 1 or len(val or []) > 1):
        _fail(ValueError("--data and --val take one TASKDIR each for one task (several tasks: --task a,b --data a=DIR ...)"))
    args = TrainArgs(
        task=task, data=data[0], out=out, vocab=vocab, val=(val or [None])[0] if not multi else None, config=config,
        init_from=init_from, task_data=task_data, task_val=task_val, task_lr=per_task["--task-lr"] or None,
        task_batch_size=per_task["--task-batch-size"] or None, task_iter_gap=per_task["--task-iter-gap"] or None,
        schedule=schedule, task_tokens=task_tokens,
        init_text_from=init_text_from, batch_size=batch_size, grad_accum=grad_accum, lr=lr, bert_lr_mult=bert_lr_mult,
        warmup=warmup, epochs=epochs, steps=steps, max_text_len=max_text_len, max_regions=max_regions,
        feature_norm=feature_norm, precision=precision, device=device, resume=resume, seed=seed, num_workers=num_workers, resampled=resampled,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, eval_every=eval_every,
        clip_grad=clip_grad, activation_checkpointing=activation_checkpointing, progress=progress, threads=threads,
    )  # fmt: skip
    try:
        summary = run_train(args)
    except (TrainingError, FileNotFoundError, ValueError, DiskFullError) as exc:  # a message, not a traceback
        _fail(exc)
    if summary["rank"] != 0:  # under torchrun only the first process reports
        return
    last = ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary["last"].items()))
    best = summary["best"]
    typer.echo(f"trained {summary['steps']} steps ({summary['samples']} samples, {summary['precision']}): {last}")
    if best["metric"] is not None:
        typer.echo(f"best validation {best['metric']:.4f} at step {best['step']} -> {out}/best/")
    for warning in summary["warnings"]:
        typer.secho(f"WARNING: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"run folder: {out}")



def _task_values(items: list[str], option: str, kind: type) -> dict[str, Any]:
    """TASK=VALUE items of a multi-task option as {task: value}; a ValueError naming the option for a bad item."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} {item!r}: expected TASK=VALUE (e.g. vqa=tasks/vqa_train)")
        try:
            out[name.strip()] = kind(value)
        except ValueError:
            what = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            raise ValueError(f"{option} {item!r}: {value!r} is not {what}") from None
    return out


# ---------------------------------------------------------------- eval, explain (owner: vilbert_core/evaluation)
# COMMAND: eval
@app.command("eval")
def eval_cmd(
    task: str = typer.Option(..., "--task", help=_task_names("vilbert_core.tasks") + "."),
    model: str = typer.Option(
        ...,
        "--model",
        help="A run directory of `vilbert-data train` (reads train_args.json), a save_pretrained folder, "
        "or a reference pytorch_model.bin (then give --vocab, and --answers for vqa).",
    ),
    data: list[str] = typer.Option(
        ...,
        "--data",
        help="TASKDIR written by `vilbert-data shard`; repeat for several splits (e.g. RefCOCO val, testA).",
    ),
    out: str = typer.Option(..., "--out", help="Report folder: metrics.json, report.md, plots, predictions."),
    batch_size: int = typer.Option(
        64, "--batch-size", help="Samples (retrieval: image-caption pairs) per forward pass."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    vocab: str | None = typer.Option(
        None, "--vocab", help="vocab.txt / tokenizer folder when --model has no train_args.json."
    ),
    answers: str | None = typer.Option(
        None, "--answers", help="VQA answer list (answers.json) when --model has none."
    ),
    num_candidates: int = typer.Option(
        100, "--num-candidates", help="Retrieval: candidates per query of the paper's protocol."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the retrieval candidate draws and the pretraining masks/negatives."
    ),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="fp32 (exact) or bf16 (autocast; faster on GPUs, scores may move slightly).",
    ),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader processes reading the task shards."),
    max_images: int | None = typer.Option(
        None,
        "--max-images",
        help="Retrieval: score only the first N images and their captions (quick checks).",
    ),
    train_data: str | None = typer.Option(
        None, "--train-data",
        help=_literal("VQA: training TASKDIR for the blind baselines (question-only prior, majority answer) "
                      "[default: the run's --data]."),
    ),
    vision_check: bool = typer.Option(
        True, "--vision-check/--no-vision-check",
        help="VQA, VCR, RefCOCO: score again with each image's regions taken from another image (one more pass).",
    ),
    rerank_top_k: int = typer.Option(
        0, "--rerank-top-k",
        help="Retrieval with --precision bf16: rescore each query's top K pairs of the bf16 pass in fp32 and "
             "rank them first (0: off). Near-fp32 rankings at about bf16 speed; report.md says how many "
             "queries it changed.",
    ),
    progress: bool = _PROGRESS,
) -> None:
    """Score a model with the task's official metrics; write metrics.json, report.md, plots and predictions.

    Beside the model, every report shows what a blind model scores and whether the model uses the image: the score with every image's regions replaced by another image's (a drop of under 1 point is flagged), and the blind baselines.

    vqa: official VQA accuracy (overall, per answer type and question type) beside the question-only prior (most common training answer per question) and the majority answer; the submission file [{"question_id", "answer"}].

    vcr: Q->A, QA->R and Q->AR accuracy. refcoco: accuracy (top region IoU >= 0.5) per split.

    retrieval: image and text retrieval R@1/5/10 over the full set and with 100 candidates per query; a pretraining model is scored zero-shot through its alignment head.

    pretrain: masked-token accuracy, perplexity, masked-region KL and alignment accuracy. Every task's metrics: docs/evaluation.md.

    Example: vilbert-data eval --task vqa --model runs/vqa --data tasks/vqa_val --out reports/vqa_val
    """
    from pathlib import Path

    from vilbert_core.evaluation.evaluator import run_eval
    from vilbert_core.evaluation.loading import EvalError
    from vilbert_core.training.distributed import configure_threads

    configure_threads(num_workers)
    try:
        record = run_eval(task, model, data, out, batch_size=batch_size, device=device, vocab=vocab, answers=answers,
                          num_candidates=num_candidates, seed=seed, precision=precision,
                          num_workers=num_workers, max_images=max_images, progress=progress,
                          train_data=train_data, vision_check=vision_check,
                          rerank_top_k=rerank_top_k)  # fmt: skip
    except (EvalError, FileNotFoundError, ValueError) as err:
        _fail(err)
    typer.echo((Path(out) / "report.md").read_text(encoding="utf-8"))
    typer.echo(
        f"wrote {out}/metrics.json, {out}/report.md" + "".join(f", {out}/{f}" for f in record["files"])
    )


# COMMAND: explain
@app.command("explain")
def explain_cmd(
    model: str = typer.Option(
        ..., "--model", help="A run directory, save_pretrained folder or reference checkpoint."
    ),
    features: str = typer.Option(
        ..., "--features", help="Feature set folder written by `vilbert-data extract`."
    ),
    image_id: str = typer.Option(
        ..., "--image-id", help="Image id in the feature set (see `vilbert-data inspect`)."
    ),
    text: str = typer.Option(..., "--text", help="A caption, question or referring expression."),
    out: str = typer.Option(
        "explain.png", "--out", help="PNG to write; the numbers go to the same name with .json."
    ),
    size: str = typer.Option("1200x900", "--size", help="Picture size in pixels, WIDTHxHEIGHT."),
    image: str | None = typer.Option(None, "--image", help="The image file, when it moved since extraction."),
    head: str = typer.Option(
        "auto",
        "--head",
        help="What to report: auto, align (pretraining), vqa, refer (region ranking) or pair.",
    ),
    top_k: int = typer.Option(3, "--top-k", help="Regions drawn per word."),
    vocab: str | None = typer.Option(None, "--vocab", help="vocab.txt when --model has no train_args.json."),
    answers: str | None = typer.Option(None, "--answers", help="VQA answer list when --model has none."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Draw where the model looks: the image, its regions and, per word, the heaviest regions.

    Per word: the regions with the largest text-to-image attention in the last co-attention layer, averaged over heads. Also shown: the alignment probability (pretraining model), the top VQA answers (VQA head) or the region ranking of a referring expression.

    Example: vilbert-data explain --model runs/vqa --features feats/ --image-id photos_dog --text "what color is the dog?" --out dog.png
    """
    from vilbert_core.evaluation.explain import run_explain
    from vilbert_core.evaluation.loading import EvalError

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        typer.echo(f"error: --size {size!r} must be WIDTHxHEIGHT, e.g. 1200x900", err=True)
        raise typer.Exit(2) from None
    try:
        expl = run_explain(model, features, image_id, text, out, size=(w, h), image=image, head=head, top_k=top_k,
                           vocab=vocab, answers=answers, device=device)  # fmt: skip
    except (EvalError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    for word, picks in zip(expl.words, expl.word_regions, strict=True):
        typer.echo(f"{word:>15}: " + ", ".join(f"box {i} ({w:.2f})" for i, w in picks))
    if expl.alignment_probability is not None:
        typer.echo(f"alignment probability: {expl.alignment_probability:.3f}")
    for a, p in expl.vqa_answers or []:
        typer.echo(f"answer {a!r}: {p:.3f}")
    for rank, (i, p) in enumerate(expl.region_ranking or []):
        typer.echo(f"#{rank + 1}: box {i} ({p:.3f})")
    typer.echo(f"wrote {out}")


# ---------------------------------------------------------------- demo (owner: README/demo)
# COMMAND: demo
_DEMO = Path(__file__).resolve().parent / "demo"  # the sample and demo/run_demo.py ship with the checkout


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Folder for every artefact of the demo."),
    weights: str | None = typer.Option(
        None, help="Real detector checkpoint; omitted: RANDOM detector weights (a pipeline preview only)."
    ),
    sample: Path = typer.Option(_DEMO / "sample", help="Sample folder: images/, captions_*.json, VQA questions/annotations."),
    pretrain_steps: int = typer.Option(600, help="Optimiser steps of pretraining."),
    steps: int = typer.Option(1200, help="Optimiser steps of VQA fine-tuning."),
    fresh: bool = typer.Option(True, help="Delete OUT first so that every step runs again."),
) -> None:
    """Run the whole chain on the bundled sample: extract, inspect, shard, pretrain, fine-tune, eval, explain.

    Every step's command is printed so that you can rerun it by hand.

    Example: vilbert-data demo --out demo_out
    """
    import importlib.util

    # demo/ is no installed package: load its runner from the checkout, beside the sample it runs on
    spec = importlib.util.spec_from_file_location("run_demo", _DEMO / "run_demo.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    runner.run_demo(out, weights, sample, pretrain_steps, steps, fresh)


if __name__ == "__main__":
    app()
