"""Detector benchmark: images/s, time split, fraction of matmul peak, the selection step batched vs loop,
and (--batching) what the batching rule costs.

Full-size ResNet-101 C4 at 600/1000 with 300 proposals (the original test settings), random weights
(speed does not depend on the values). Run from the repository root:

    .venv/bin/python bench/bench_detector.py --device cpu --images 2 --repeats 1
    .venv/bin/python bench/bench_detector.py --device cuda --images 64 --batch-size 1,16 --repeats 2 --dtypes fp32,bf16,fp16
    .venv/bin/python bench/bench_detector.py --batching --device cuda --images 64 --batch-size 4,8 --dtypes bf16

The pipeline table splits each image's time into decode (JPEG bytes -> RGB, `extract.load_image`),
preprocess, backbone, RPN, box head, selection (with packaging into numpy) and encode (the shard
members, `pipelines.formats.features.encode_detections`), with the device synchronised between stages. Images
run in forward passes of one input size with `--batch-size` slots, as `Detector.detect` runs them;
`--batch-size` takes a comma list. On CUDA the table also gives `detect()` itself (no stage
synchronisation) and, per autocast precision, how far the features of the fp32 regions move
(`Detector.features_for_boxes` on the fp32 boxes).

--batching compares, on COCO-like photos of mixed sizes, one image per forward pass, the rule `detect`
follows (passes of one input size, always `--batch-size` slots) and the old padded mixed batches, and
checks how far an image's features move when it shares a pass.

Prints a markdown report (and writes it with --out). CPU numbers depend on the number of free cores.
"""

from __future__ import annotations

import argparse
import io
import platform
import time
import warnings
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from extract import Detector, DetectorConfig, load_image
from extract.selection import choose_boxes, max_conf_loop, select_regions
from pipelines.formats.features import encode_detections


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Measured dense matmul throughput (TFLOP/s) for an n x n x n product, best of `repeats`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeats, device) / 1e12


class FlopCounter:
    """Counts conv and linear FLOPs (2 x multiply-adds) through forward hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.flops = 0
        self.handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
        ]

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Add this call's FLOPs."""
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            self.flops += 2 * output.numel() * k
        else:
            self.flops += 2 * output.numel() * module.in_features

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self.handles:
            h.remove()


def test_images(n: int) -> list[Image.Image]:
    """Real photographs from scikit-image, cycled to n images (random pixels if it is missing)."""
    try:
        from skimage import data

        pool = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except Exception:
        rng = np.random.default_rng(0)
        pool = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)]
    return [Image.fromarray(pool[i % len(pool)]) for i in range(n)]


def jpeg_bytes(images: list[Image.Image], quality: int = 90) -> list[bytes]:
    """Each image as JPEG file bytes (what the extraction job reads)."""
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def run_pipeline(det: Detector, files: list[bytes], repeats: int) -> dict:
    """Time each stage over the JPEG files, in the forward passes `detect` makes; seconds per image per stage, FLOPs.

    Passes hold images of one input size in `det.config.batch_size` slots (`Detector.forward_groups`).
    FLOPs are counted over the first repeat, empty slots included.
    """
    stages = dict.fromkeys(
        ("decode", "preprocess", "backbone", "rpn", "box_head", "selection", "encode"), 0.0
    )
    dev = det.device
    layer = det.config.feature_layer
    images = [load_image(f) for f in files]
    groups = det.forward_groups(images)
    counter = FlopCounter(det.model)
    total_images = 0
    for rep in range(repeats):
        for group in groups:
            with torch.inference_mode():
                t = time.perf_counter()
                chunk = [load_image(files[i]) for i in group]
                stages["decode"] += time.perf_counter() - t
                t0 = time.perf_counter()
                batch = det.preprocess(chunk, slots=det.config.batch_size)
                sync(dev)
                t1 = time.perf_counter()
                with det.autocast_context():
                    feats = det.backbone_features(batch)
                    sync(dev)
                    t2 = time.perf_counter()
                    props = det.proposals(feats, batch)
                    sync(dev)
                    t3 = time.perf_counter()
                    head = det.box_head(feats, props)
                    sync(dev)
                t4 = time.perf_counter()
                dets = det.select(props, head, batch)
                sync(dev)
                t5 = time.perf_counter()
            for i, d in zip(group, dets, strict=True):
                encode_detections(f"img{i}", "", d, layer)
            t6 = time.perf_counter()
            for name, dt in zip(
                list(stages)[1:], (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True
            ):
                stages[name] += dt
            total_images += len(chunk)
        if rep == 0:
            flops_per_image = counter.flops / total_images
            counter.remove()
    per_image = {k: v / total_images for k, v in stages.items()}
    return {
        "per_image": per_image,
        "seconds_per_image": sum(per_image.values()),
        "flops_per_image": flops_per_image,
    }


# COCO-like original sizes (w, h): 640x480 and 500x375 share the 800x600 input, 480x640 and 640x427 do not.
MIXED_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375))


def mixed_images(n: int) -> list[Image.Image]:
    """n photographs resized to a cycle of COCO-like sizes (the mix the batching rule must handle)."""
    return [img.resize(MIXED_SIZES[i % len(MIXED_SIZES)]) for i, img in enumerate(test_images(n))]


def padded_detect(det: Detector, images: list[Image.Image]) -> list:
    """The old rule: one forward pass over images of any sizes, zero-padded bottom/right to the largest."""
    with torch.inference_mode():
        return det.run_pass(det.preprocess(images))


def bench_batching(base: Detector, images: list[Image.Image], batch_size: int, repeats: int) -> list[str]:
    """Markdown rows: images/s, passes, empty slots and feature drift of the three batching rules."""
    one = Detector(base.model, replace(base.config, batch_size=1), base.device)
    rule = Detector(base.model, replace(base.config, batch_size=batch_size), base.device)
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    groups = rule.forward_groups(images)
    modes = {
        "one image per pass": (lambda: one.detect(images), len(images), 0),
        f"same input size, {batch_size} slots (the rule)": (
            lambda: rule.detect(images),
            len(groups),
            len(groups) * batch_size - len(images),
        ),
        f"padded mixed batches of {batch_size} (before)": (
            lambda: [d for c in chunks for d in padded_detect(one, c)],
            len(chunks),
            0,
        ),
    }
    # warm-up: oneDNN / cuDNN choose their kernels per input shape
    firsts = [images[i] for i in sorted({base.input_size(im): i for i, im in enumerate(images)}.values())]
    one.detect(firsts)
    rule.detect(firsts)
    rows, base_rate = [], None
    for name, (run, passes, empty) in modes.items():
        times = []
        for _ in range(repeats):
            sync(base.device)
            t = time.perf_counter()
            outs = run()
            sync(base.device)
            times.append(time.perf_counter() - t)
        seconds = min(times)
        # features of the first images alone under the same rule, against the same images in the run
        alone = [(rule.detect([im])[0] if "rule" in name else one.detect([im])[0]) for im in images[:2]]
        drift = max(
            float(np.abs(a.features - o.features).max())
            if a.features.shape == o.features.shape
            else float("inf")
            for a, o in zip(alone, outs[:2], strict=True)
        )
        rate = len(images) / seconds
        base_rate = base_rate or rate
        rows.append(f"| {name} | {passes} | {empty} | {rate:.3f} | {rate / base_rate:.2f} | {drift:.2e} |")
        print(rows[-1], flush=True)
    return rows


def selection_case(n: int, temperature: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random +1-style proposals on a 1000 x 600 input and softmax scores of a given peakiness."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([1000.0, 600.0])
    wh = torch.rand(n, 2, generator=g) * 300 + 16
    boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([999.0, 599.0]))], dim=1)
    return boxes, torch.softmax(torch.randn(n, 1601, generator=g) * temperature, dim=1)


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Fastest of `repeats` timed calls (the least disturbed by other processes on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def bench_selection(device: torch.device, repeats: int) -> list[tuple[str, float, float]]:
    """(case, loop seconds, batched seconds) for 300 proposals x 1600 classes."""
    rows = []
    for label, temperature in [("peaky scores (trained-like)", 6.0), ("flat scores (random weights)", 0.5)]:
        boxes, scores = (t.to(device) for t in selection_case(300, temperature))
        batched = best_time(lambda b=boxes, s=scores: select_regions(b, s), repeats, device)
        loop = best_time(
            lambda b=boxes, s=scores: choose_boxes(max_conf_loop(b, s), 0.2, 10, 36),
            max(2, repeats // 5),
            device,
        )
        rows.append((label, loop, batched))
    return rows


def batch_sizes(text: str) -> list[int]:
    """--batch-size: one or more images-per-pass values, comma-separated."""
    sizes = [int(x) for x in text.split(",")]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def warm_up(det: Detector, images: list[Image.Image]) -> None:
    """Run the shapes the timed runs will see: cuDNN picks kernels and CUDA loads modules per shape.

    On CUDA one full-size pass per input size; on the CPU (11 s a full-size image) a small input only.
    """
    if det.device.type == "cuda":
        firsts = {det.input_size(im): im for im in reversed(images)}
        det.detect(list(firsts.values()))
    else:
        small = replace(det.config, min_size=200, max_size=300, post_nms_topk=20)
        Detector(det.model, small, det.device).detect(images[:1])


def detect_rate(det: Detector, images: list[Image.Image], repeats: int) -> float:
    """Images/s of `Detector.detect` on decoded images, no stage synchronisation (fastest of `repeats`)."""
    return len(images) / best_time(lambda: det.detect(images), repeats, det.device)


def precision_error(ref: Detector, det: Detector, images: list[Image.Image]) -> dict:
    """How far autocast moves the features of the fp32 regions, and how many of the fp32 boxes it keeps.

    Features: `features_for_boxes` on the boxes fp32 detection chose, ||x - x_fp32|| / ||x_fp32|| over all
    regions and the largest absolute difference; boxes: the fraction of fp32 boxes that the autocast
    detection also returns (same coordinates to 0.5 pixel).
    """
    num = den = 0.0
    worst = kept = total = 0.0
    for img in images:
        (a,) = ref.detect([img])
        b = det.features_for_boxes(img, a.boxes)
        num += float(np.square(b.features - a.features).sum())
        den += float(np.square(a.features).sum())
        worst = max(worst, float(np.abs(b.features - a.features).max(initial=0.0)))
        (c,) = det.detect([img])
        near = np.abs(a.boxes[:, None, :] - c.boxes[None, :, :]).max(axis=2) <= 0.5
        kept += float(near.any(axis=1).sum())
        total += a.num_boxes
    return {"rel": (num / den) ** 0.5 if den else 0.0, "max_abs": worst, "boxes_kept": kept / max(total, 1)}


def main() -> None:
    """Parse options, run the measurements, print (and write) the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--images", type=int, default=2, help="images per repeat")
    ap.add_argument(
        "--batch-size", type=batch_sizes, default=[1], help="images per forward pass; a comma list runs each"
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (fp16: CUDA only)")
    ap.add_argument("--depth", type=int, default=101)
    ap.add_argument("--post-nms-topk", type=int, default=300)
    ap.add_argument(
        "--matmul-size", type=int, default=0, help="matmul side (default 2048 on CPU, 8192 on CUDA)"
    )
    ap.add_argument("--selection-repeats", type=int, default=20)
    ap.add_argument("--skip-pipeline", action="store_true", help="only the matmul and selection measurements")
    ap.add_argument(
        "--batching", action="store_true", help="only the cost of the batching rule (mixed-size photos)"
    )
    ap.add_argument("--min-size", type=int, default=600)
    ap.add_argument("--max-size", type=int, default=1000)
    ap.add_argument(
        "--detect-rate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="also time detect() without stage syncs and the autocast feature error (auto: on CUDA)",
    )
    ap.add_argument("--out", default="", help="also write the report to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    lines = ["## Detector benchmark", ""]
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines += [
        f"- device: {device.type} ({machine}); torch {torch.__version__}",
        f"- command: `{' '.join(__import__('sys').argv)}`",
    ]

    dtype_of = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks = {"fp32": matmul_tflops(device, torch.float32, n)}
    peaks["bf16"] = matmul_tflops(device, torch.bfloat16, n)
    if device.type == "cuda":
        peaks["fp16"] = matmul_tflops(device, torch.float16, n)
    lines += [
        "",
        f"Measured matmul throughput ({n}^3): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()),
    ]
    config = DetectorConfig(
        depth=args.depth, post_nms_topk=args.post_nms_topk, min_size=args.min_size, max_size=args.max_size
    )

    if args.batching:
        first = args.dtypes.split(",")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = Detector.from_checkpoint(
                None, device=device, config=replace(config, autocast=None if first == "fp32" else first)
            )
        images = mixed_images(args.images)
        sizes = sorted({base.input_size(im) for im in images})
        lines += [
            "",
            f"Batching rule: R-{args.depth} C4, {args.min_size}/{args.max_size}, {args.post_nms_topk} proposals, "
            f"{first}, {args.images} COCO-like photos in {len(sizes)} input sizes {sizes}, "
            f"fastest of {args.repeats}",
        ]
        for bs in args.batch_size:
            lines += [
                "",
                f"Batch size {bs}:",
                "",
                "| rule | forward passes | empty slots | images/s | vs one per pass | max feature change in a batch |",
                "|---|---|---|---|---|---|",
                *bench_batching(base, images, bs, args.repeats),
            ]
        emit(lines, args.out)
        return

    if not args.skip_pipeline:
        files = jpeg_bytes(test_images(args.images))
        images = [load_image(f) for f in files]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = Detector.from_checkpoint(None, device=device, config=config)
        sizes = sorted({base.input_size(im) for im in images})
        with_rate = args.detect_rate == "yes" or (args.detect_rate == "auto" and device.type == "cuda")
        lines += [
            "",
            f"Full pipeline: R-{args.depth} C4, {base.config.min_size}/{base.config.max_size}, "
            f"{args.post_nms_topk} proposals, {args.images} JPEG photographs in {len(sizes)} input sizes "
            f"{sizes} x {args.repeats} repeats; a forward pass holds images of one input size in "
            f"batch-size slots. Stage columns: seconds per image (share of the stage sum).",
            "",
            "| precision | batch | images/s (stages) | detect() images/s | s/image | decode | preprocess | backbone "
            "| RPN | box head | selection | encode | TFLOP/image | achieved TFLOP/s | fraction of matmul peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        errors = []
        ref = None
        for name in args.dtypes.split(","):
            autocast = None if name == "fp32" else name
            if autocast == "fp16" and device.type != "cuda":
                continue
            for bs in args.batch_size:
                det = Detector(base.model, replace(base.config, autocast=autocast, batch_size=bs), device)
                warm_up(det, images)
                # the peak measured just before, under the same load as the run
                peaks[name] = max(peaks[name], matmul_tflops(device, dtype_of[name], n))
                r = run_pipeline(det, files, args.repeats)
                rate = f"{detect_rate(det, images, args.repeats):.3f}" if with_rate else "-"
                s = r["seconds_per_image"]
                achieved = r["flops_per_image"] / s / 1e12
                split = " | ".join(f"{v:.4f} s ({100 * v / s:.0f}%)" for v in r["per_image"].values())
                lines.append(
                    f"| {name} | {bs} | {1 / s:.3f} | {rate} | {s:.4f} | {split} | "
                    f"{r['flops_per_image'] / 1e12:.2f} | {achieved:.3f} | {achieved / peaks[name]:.2f} |"
                )
                print(lines[-1], flush=True)
            if autocast is None:
                ref = Detector(base.model, replace(base.config, batch_size=1), device)
            elif with_rate and ref is not None:
                e = precision_error(ref, Detector(base.model, replace(base.config, autocast=autocast), device),
                                    images[: min(4, len(images))])  # fmt: skip
                errors.append(
                    f"| {name} | {e['rel']:.2e} | {e['max_abs']:.2e} | {100 * e['boxes_kept']:.1f}% |"
                )
        if errors:
            lines += [
                "",
                "Autocast against fp32 on the first photographs: features of the fp32 regions "
                "(`features_for_boxes`), relative L2 error and largest absolute change; share of the fp32 "
                "boxes the autocast detection also returns (random weights: boxes are sensitive to rounding)",
                "",
                "| precision | feature rel. error | max abs change | fp32 boxes kept |",
                "|---|---|---|---|",
                *errors,
            ]

    # One thread on the CPU: the selection is many small ops, and on a shared machine a second OpenMP
    # thread that is not scheduled makes every parallel region wait (both variants measured alike).
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = bench_selection(device, args.selection_repeats)
    torch.set_num_threads(threads)
    lines += [
        "",
        "Region selection alone (300 proposals x 1600 classes, fastest of the repeats, 1 CPU thread): per-class NMS loop vs one batched offset NMS",
        "",
        "| scores | per-class loop | batched | speed-up |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {loop * 1e3:.1f} ms | {b * 1e3:.2f} ms | {loop / b:.0f}x |" for label, loop, b in rows
    ]
    lines += [
        "",
        "Matmul peak used for the fractions (best of the start and just before each run): "
        + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()),
    ]
    emit(lines, args.out)


def emit(lines: list[str], out: str) -> None:
    """Print the markdown report, and write it to `out` when given."""
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        with open(out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
