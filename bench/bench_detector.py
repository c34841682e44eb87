"""Detector benchmark: images/s, time split, fraction of matmul peak, the selection step batched vs loop,
and (--batching) what the batching rule costs.

Full-size ResNet-101 C4 at 600/1000 with 300 proposals (the original test settings), random weights
(speed does not depend on the values). Run from the repository root:

    .venv/bin/python bench/bench_detector.py --device cpu --images 2 --repeats 1
    .venv/bin/python bench/bench_detector.py --device cuda --images 64 --batch-size 16 --repeats 3
    .venv/bin/python bench/bench_detector.py --batching --device cuda --images 64 --batch-size 4 --dtypes bf16

--batching compares, on COCO-like photos of mixed sizes, one image per forward pass, the rule `detect`
follows (passes of one input size, always `--batch-size` slots) and the old padded mixed batches, and
checks how far an image's features move when it shares a pass.

Prints a markdown report (and writes it with --out). CPU numbers depend on the number of free cores.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from extract import Detector, DetectorConfig
from extract.selection import choose_boxes, max_conf_loop, select_regions


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


def run_pipeline(det: Detector, images: list[Image.Image], batch_size: int, repeats: int) -> dict:
    """Time each stage of detect() over the images (selection includes packaging); seconds per image per stage, FLOPs."""
    stages = dict.fromkeys(("preprocess", "backbone", "rpn", "box_head", "selection"), 0.0)
    dev = det.device
    counter = FlopCounter(det.model)
    total_images = 0
    for rep in range(repeats):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            with torch.inference_mode():
                t0 = time.perf_counter()
                batch = det.preprocess(chunk)
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
                det.select(props, head, batch)
                sync(dev)
                t5 = time.perf_counter()
            for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                stages[name] += dt
            total_images += len(chunk)
            if rep == 0 and start == 0:
                flops_per_image = counter.flops / len(chunk)
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


def main() -> None:
    """Parse options, run the measurements, print (and write) the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--images", type=int, default=2, help="images per repeat")
    ap.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
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

    if args.batching:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = Detector.from_checkpoint(
                None,
                device=device,
                config=DetectorConfig(
                    depth=args.depth,
                    post_nms_topk=args.post_nms_topk,
                    min_size=args.min_size,
                    max_size=args.max_size,
                    autocast=None if args.dtypes.split(",")[0] == "fp32" else args.dtypes.split(",")[0],
                ),
            )
        images = mixed_images(args.images)
        sizes = sorted({base.input_size(im) for im in images})
        lines += [
            "",
            f"Batching rule: R-{args.depth} C4, {args.min_size}/{args.max_size}, {args.post_nms_topk} proposals, "
            f"{args.dtypes.split(',')[0]}, {args.images} COCO-like photos in {len(sizes)} input sizes {sizes}, "
            f"fastest of {args.repeats}",
            "",
            "| rule | forward passes | empty slots | images/s | vs one per pass | max feature change in a batch |",
            "|---|---|---|---|---|---|",
            *bench_batching(base, images, args.batch_size, args.repeats),
        ]
        emit(lines, args.out)
        return

    if not args.skip_pipeline:
        images = test_images(args.images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = Detector.from_checkpoint(
                None, device=device, config=DetectorConfig(depth=args.depth, post_nms_topk=args.post_nms_topk)
            )
        lines += [
            "",
            f"Full pipeline: R-{args.depth} C4, {base.config.min_size}/{base.config.max_size}, "
            f"{args.post_nms_topk} proposals, batch {args.batch_size}, {args.images} images x {args.repeats} repeats",
            "",
            "| precision | images/s | s/image | preprocess | backbone | RPN | box head | selection | TFLOP/image | achieved TFLOP/s | fraction of matmul peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in args.dtypes.split(","):
            autocast = None if name == "fp32" else name
            if autocast == "fp16" and device.type != "cuda":
                continue
            det = Detector(base.model, replace(base.config, autocast=autocast), device)
            # warm-up (oneDNN / cuDNN algorithm choice) on a small input, per precision
            warm = Detector(
                base.model, replace(det.config, min_size=200, max_size=300, post_nms_topk=20), device
            )
            warm.detect(images[:1])
            peaks[name] = max(peaks[name], matmul_tflops(device, dtype_of[name], n))  # same load as the run
            r = run_pipeline(det, images, args.batch_size, args.repeats)
            s = r["seconds_per_image"]
            achieved = r["flops_per_image"] / s / 1e12
            split = " | ".join(f"{v:.3f} s ({100 * v / s:.0f}%)" for v in r["per_image"].values())
            lines.append(
                f"| {name} | {1 / s:.3f} | {s:.2f} | {split} | {r['flops_per_image'] / 1e12:.2f} | {achieved:.3f} | "
                f"{achieved / peaks[name]:.2f} |"
            )
            print(lines[-1], flush=True)

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
