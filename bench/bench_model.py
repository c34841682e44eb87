"""ViLBERT training-step benchmark: samples/s, peak memory, model FLOPs utilisation.

One step = forward + pretraining losses + backward + AdamW, on the paper config by default, batch 8,
36 text tokens, 36+1 regions. Variants: attention through SDPA or the plain matmul-softmax path
("eager"), fp32 or bf16 autocast. Each precision runs in its own subprocess; inside it the two attention
paths alternate step by step on one model, so that both see the same load on a shared machine. Peak
memory is measured per step (peak RSS via VmHWM on the CPU, torch.cuda.max_memory_allocated on CUDA).

Model FLOPs per sample are counted once with torch.utils.flop_counter on the meta device (no compute),
and the machine's peak is measured with a large matmul in the same dtype, so the throughput reads as a
fraction of peak (model FLOPs utilisation, MFU).

Examples:
    .venv/bin/python bench/bench_model.py                          # CPU, paper config, all 4 variants
    .venv/bin/python bench/bench_model.py --device cuda --steps 20 --warmup 5
    .venv/bin/python bench/bench_model.py --config tiny --steps 5  # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining  # noqa: E402

VARIANTS = ("sdpa-fp32", "eager-fp32", "sdpa-bf16", "eager-bf16")


def make_batch(
    cfg: ViLBERTConfig, batch: int, tokens: int, regions: int, device: str
) -> dict[str, torch.Tensor]:
    """A random pretraining batch of the contract's shapes (region 0 = global [IMG] region)."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(batch, regions, cfg.v_target_size, generator=g)
    target = target / target.sum(-1, keepdim=True)
    batch_dict = {
        "input_ids": torch.randint(1, cfg.vocab_size, (batch, tokens), generator=g),
        "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "image_feat": torch.randn(batch, regions, cfg.v_feature_size, generator=g),
        "image_loc": torch.rand(batch, regions, 5, generator=g),
        "image_mask": torch.ones(batch, regions, dtype=torch.long),
        "mlm_labels": torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g),
        "image_target": target,
        "align_label": torch.randint(0, 2, (batch,), generator=g).float(),
    }
    return {k: v.to(device) for k, v in batch_dict.items()}


_MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "image_feat", "image_loc", "image_mask")


def pretraining_loss(model: ViLBERTForPretraining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLM cross-entropy + MRM KL + alignment BCE over every position (same cost as the trainer's worst case)."""
    out = model(**{k: batch[k] for k in _MODEL_INPUTS})
    mlm = torch.nn.functional.cross_entropy(
        out.mlm_logits.flatten(0, 1).float(), batch["mlm_labels"].flatten()
    )
    log_p = out.mrm_logits.float().log_softmax(-1)
    mrm = torch.nn.functional.kl_div(log_p, batch["image_target"], reduction="batchmean")
    align = torch.nn.functional.binary_cross_entropy_with_logits(
        out.align_logit.float(), batch["align_label"]
    )
    return mlm + mrm + align


def count_flops_per_sample(cfg: ViLBERTConfig, batch: int, tokens: int, regions: int) -> float:
    """Forward+backward FLOPs per sample, counted on the meta device (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dataclasses.replace(cfg, attn_implementation="eager")  # counted as plain matmuls
    with torch.device("meta"):
        model = ViLBERTForPretraining(cfg).train()
        data = make_batch(cfg, batch, tokens, regions, "meta")
    counter = FlopCounterMode(display=False)
    with counter:
        pretraining_loss(model, data).backward()
    return counter.get_total_flops() / batch


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Measured dense matmul throughput (FLOP/s) of an n x n x n product in dtype."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def attention_microbench(device: str, batch: int, tokens: int, regions: int, repeats: int) -> list[dict]:
    """Forward+backward of the attention cores alone at the paper's shapes, SDPA vs eager, interleaved."""
    from vilbert_core.modeling import attend

    shapes = {  # name: (heads, head dim, queries, keys)
        "text self (12x64, 36x36)": (12, 64, tokens, tokens),
        "visual self (8x128, 37x37)": (8, 128, regions, regions),
        "co text->image (8x128, 36x37)": (8, 128, tokens, regions),
    }
    rows = []
    for name, (heads, dim, nq, nk) in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(batch, heads, nq, dim, generator=g).to(device, dtype).requires_grad_()
            k = torch.randn(batch, heads, nk, dim, generator=g).to(device, dtype).requires_grad_()
            v = torch.randn(batch, heads, nk, dim, generator=g).to(device, dtype).requires_grad_()
            keep = torch.ones(batch, 1, 1, nk, dtype=torch.bool, device=device)
            keep[0, ..., -3:] = False  # some padding, as in real batches
            times: dict[str, list[float]] = {"sdpa": [], "eager": []}
            for i in range(repeats + 3):
                for impl in ("sdpa", "eager") if i % 2 == 0 else ("eager", "sdpa"):
                    _sync(device)
                    start = time.perf_counter()
                    out, _ = attend(q, k, v, keep, implementation=impl)
                    out.sum().backward()
                    _sync(device)
                    if i >= 3:  # first rounds warm up kernels
                        times[impl].append(time.perf_counter() - start)
            med = {impl: sorted(t)[len(t) // 2] for impl, t in times.items()}
            rows.append(
                {
                    "shape": name,
                    "dtype": str(dtype).replace("torch.", ""),
                    "sdpa_ms": 1e3 * med["sdpa"],
                    "eager_ms": 1e3 * med["eager"],
                    "speedup": med["eager"] / med["sdpa"],
                }
            )
    return rows


def _sync(device: str) -> None:
    """Wait for queued GPU work so that timings are real."""
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last _reset_peak (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _reset_peak(device: str) -> None:
    """Start a fresh peak-memory window (Linux resets VmHWM when 5 is written to clear_refs)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak(device: str) -> int:
    """Peak memory of the current window: CUDA allocator peak or peak RSS."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()


def run_precision(args: argparse.Namespace, precision: str, impls: list[str]) -> list[dict]:
    """Time training steps of one precision, alternating the attention paths step by step.

    Alternating (AB, BA, AB, ...) on one model in one process puts both paths under the same machine
    load, which matters on a shared CPU; each step's peak memory is measured in its own window.
    """
    device = args.device
    rss_start = _rss_bytes()  # torch alone holds ~0.7 GiB; the model's own memory is what comes on top
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset(args.config)
    model = ViLBERTForPretraining(cfg).to(device).train()
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=device == "cuda")
    batch = make_batch(cfg, args.batch, args.tokens, args.regions, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step(impl: str) -> tuple[float, int]:
        """One training step with the given attention path; returns (seconds, peak memory bytes)."""
        model.set_attn_implementation(impl)
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        with autocast:
            loss = pretraining_loss(step_model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start, _peak(device)

    for _ in range(args.warmup):
        for impl in impls:
            step(impl)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    peaks: dict[str, int] = dict.fromkeys(impls, 0)
    for i in range(args.steps):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            seconds, peak = step(impl)
            times[impl].append(seconds)
            peaks[impl] = max(peaks[impl], peak)
    rows = []
    for impl in impls:
        median = sorted(times[impl])[len(times[impl]) // 2]
        rows.append(
            {
                "variant": f"{impl}-{precision}",
                "step_s_median": median,
                "step_s_all": times[impl],
                "samples_per_s": args.batch / median,
                "peak_memory_gib": peaks[impl] / 2**30,
                "peak_over_import_gib": (peaks[impl] - (rss_start if device == "cpu" else 0)) / 2**30,
                "num_parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    return rows


def main() -> None:
    """Parse options, run each variant in a subprocess, print a table and optionally write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="vilbert-base", help="ViLBERTConfig preset")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=36)
    parser.add_argument("--regions", type=int, default=37, help="36 detected regions + the global [IMG] one")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {VARIANTS}")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument(
        "--peak-size", type=int, default=0, help="matmul size for the peak (0: 2048 CPU, 8192 CUDA)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    parser.add_argument(
        "--attention-only", action="store_true", help="only the attention-core micro-benchmark (fast)"
    )
    parser.add_argument("--attention-repeats", type=int, default=50)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.child:  # one precision, its rows as one JSON line on stdout
        precision, impls = args.child.split(":")
        print(json.dumps(run_precision(args, precision, impls.split(","))))
        return

    attention = attention_microbench(
        args.device, args.batch, args.tokens, args.regions, args.attention_repeats
    )
    for row in attention:
        print(
            f"attention {row['shape']:30s} {row['dtype']:8s} sdpa {row['sdpa_ms']:.3f} ms  "
            f"eager {row['eager_ms']:.3f} ms  speedup x{row['speedup']:.2f}",
            flush=True,
        )
    if args.attention_only:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": args.device, "attention": attention}, indent=2) + "\n")
        return

    cfg = ViLBERTConfig.preset(args.config)
    flops = count_flops_per_sample(cfg, args.batch, args.tokens, args.regions)
    n = args.peak_size or (8192 if args.device == "cuda" else 2048)
    repeats = 20 if args.device == "cuda" else 3
    peaks = {
        "fp32": matmul_peak(args.device, torch.float32, n, repeats),
        "bf16": matmul_peak(args.device, torch.bfloat16, n, repeats),
    }
    wanted = args.variants.split(",")
    for variant in wanted:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
    results = []
    for precision in ("fp32", "bf16"):
        impls = [v.split("-")[0] for v in wanted if v.endswith(precision)]
        if not impls:
            continue
        child = f"{precision}:{','.join(impls)}"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", child]  # the child ignores --out
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # record the failure and go on with the other precision
            print(f"{precision} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            results.append({"variant": child, "error": done.stderr[-2000:]})
            continue
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            row["model_flops_per_sample"] = flops
            row["achieved_flops_per_s"] = flops * row["samples_per_s"]
            row["mfu_vs_measured_matmul_peak"] = row["achieved_flops_per_s"] / peaks[precision]
            results.append(row)
            print(
                f"{row['variant']:11s} {row['samples_per_s']:8.2f} samples/s  step {row['step_s_median']:.3f} s  "
                f"peak {row['peak_memory_gib']:.2f} GiB (+{row['peak_over_import_gib']:.2f} over import)  "
                f"MFU {100 * row['mfu_vs_measured_matmul_peak']:.1f}%",
                flush=True,
            )
    info = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),  # other work on a shared machine skews every figure
        "device": args.device,
        "config": args.config,
        "batch": args.batch,
        "tokens": args.tokens,
        "regions": args.regions,
        "steps": args.steps,
        "warmup": args.warmup,
        "model_flops_per_sample": flops,
        "matmul_peak_flops_per_s": peaks,
        "matmul_peak_size": n,
        "results": results,
        "attention": attention,
    }
    print(
        f"model FLOPs/sample (fwd+bwd): {flops / 1e9:.1f} GFLOP; matmul peak fp32 "
        f"{peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
