"""ViLBERT training step against batch size: samples/s, MFU, peak memory, and the largest batch that fits.

One model, one process: the paper config by default, bf16 autocast, attention through SDPA, the three
pretraining losses, backward and AdamW (fused on CUDA), the step of bench_model.py (same batch
builder, loss and FLOP count). The batch doubles from --start until a step runs out of memory, the
batch passes --max-batch, or the sweep has used --budget-s seconds; the largest batch that ran is
"the largest that fits" when the sweep ended on running out of memory, and a lower bound otherwise.

MFU is given against the measured bf16 matmul peak (an 8192^3 product on CUDA) and against the chip's
dense bf16 datasheet peak (--peak-tflops, or known from the device name: H100/H200 SXM 989.4 TFLOP/s).

    python bench/bench_batch_sweep.py --device cuda --out sweep.json
    python bench/bench_batch_sweep.py --device cpu --config tiny --start 2 --max-batch 8 --steps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import count_flops_per_sample, make_batch, matmul_peak, pretraining_loss  # noqa: E402

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; first match wins.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
)


def datasheet_peak(name: str) -> float | None:
    """Dense bf16 peak (FLOP/s) of a device name, or None when unknown."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def is_oom(err: BaseException) -> bool:
    """Whether an exception is the device running out of memory."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def main() -> None:
    """Parse options, sweep the batch size, print one line per batch and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vilbert-base", help="ViLBERTConfig preset")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--tokens", type=int, default=36)
    ap.add_argument("--regions", type=int, default=37, help="36 detected regions + the global [IMG] one")
    ap.add_argument("--start", type=int, default=8, help="first batch size (then doubled)")
    ap.add_argument("--max-batch", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batch size (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--budget-s", type=float, default=90.0, help="stop doubling once the sweep used this long"
    )
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 datasheet peak (0: by name)")
    ap.add_argument(
        "--peak-size", type=int, default=0, help="matmul size of the measured peak (0: 8192/2048)"
    )
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    t_start = time.perf_counter()
    dev = args.device
    cuda = dev == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    cfg = ViLBERTConfig.preset(args.config)
    flops = count_flops_per_sample(cfg, args.start, args.tokens, args.regions)
    n = args.peak_size or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    measured = matmul_peak(dev, dtype, n, 20 if cuda else 3)
    sheet = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_peak(name)
    torch.manual_seed(0)
    model = ViLBERTForPretraining(cfg).to(dev).train()
    model.set_attn_implementation(args.attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=cuda)
    autocast = torch.autocast(dev, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    total_memory = torch.cuda.get_device_properties(0).total_memory if cuda else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(batch: dict) -> float:
        sync()
        t = time.perf_counter()
        with autocast:
            loss = pretraining_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    print(
        f"{name}; {args.config} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
        f"{args.precision}, {args.attention}; {flops / 1e9:.1f} GFLOP per sample (fwd+bwd); measured "
        f"{args.precision} matmul peak {measured / 1e12:.1f} TFLOP/s; datasheet dense bf16 "
        f"{'unknown' if sheet is None else f'{sheet / 1e12:.1f} TFLOP/s'}",
        flush=True,
    )
    rows: list[dict] = []
    stopped = "max-batch"
    bs = args.start
    while bs <= args.max_batch:
        if time.perf_counter() - t_start > args.budget_s:
            stopped = "budget"
            break
        batch, times = None, None
        try:
            batch = make_batch(cfg, bs, args.tokens, args.regions, dev)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                step(batch)
            times = sorted(step(batch) for _ in range(args.steps))
        except (RuntimeError, MemoryError) as err:
            if not is_oom(err):
                raise
        if times is None:  # out of memory: free what the failed step held (outside the except's frames)
            batch = None
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
            rows.append({"batch": bs, "oom": True})
            print(f"batch {bs:5d}: out of memory", flush=True)
            stopped = "out of memory"
            break
        median = times[len(times) // 2]
        rate = bs / median
        row = {
            "batch": bs,
            "oom": False,
            "step_s_median": median,
            "samples_per_s": rate,
            "achieved_tflops": flops * rate / 1e12,
            "mfu_vs_measured_peak": flops * rate / measured,
            "mfu_vs_datasheet_peak": None if sheet is None else flops * rate / sheet,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
        rows.append(row)
        mem = "" if not cuda else f"  peak {row['peak_memory_gib']:.2f} GiB"
        mfu_sheet = "" if sheet is None else f"  MFU {100 * row['mfu_vs_datasheet_peak']:.1f}% of datasheet"
        print(
            f"batch {bs:5d}: {rate:9.1f} samples/s  step {median * 1e3:8.1f} ms  "
            f"{row['achieved_tflops']:7.1f} TFLOP/s  MFU {100 * row['mfu_vs_measured_peak']:.1f}% of measured"
            f"{mfu_sheet}{mem}",
            flush=True,
        )
        del batch
        bs *= 2
    fits = [r["batch"] for r in rows if not r["oom"]]
    largest = max(fits) if fits else None
    print(
        f"largest batch that ran: {largest} (sweep ended on: {stopped}"
        + ("" if stopped == "out of memory" else "; the limit is higher")
        + ")"
        + ("" if total_memory is None else f"; device memory {total_memory / 2**30:.1f} GiB"),
        flush=True,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "config": args.config,
                    "precision": args.precision,
                    "attention": args.attention,
                    "tokens": args.tokens,
                    "regions": args.regions,
                    "model_flops_per_sample": flops,
                    "measured_matmul_peak_flops": measured,
                    "datasheet_bf16_peak_flops": sheet,
                    "device_memory_bytes": total_memory,
                    "rows": rows,
                    "largest_batch_that_ran": largest,
                    "ended_on": stopped,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
