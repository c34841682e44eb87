"""ViLBERT training-step benchmark: samples/s, peak memory, model FLOPs utilisation; memory levers; the reference.

One step = what the trainer computes per batch: pretraining masking, forward with the MLM / MRM heads
on the masked positions only, the three losses, backward, AdamW (`build_optimizer`: fused), on the
paper config by default, batch 8, 36 text tokens, 36+1 regions.

Modes:
- default: attention through SDPA or the plain matmul-softmax path ("eager"), fp32 or bf16 autocast.
  Each precision runs in its own subprocess; inside it the two attention paths alternate step by step
  on one model, so that both see the same load on a shared machine. Peak memory is measured per step
  (peak RSS via VmHWM on the CPU, torch.cuda.max_memory_allocated on CUDA). Model FLOPs per sample are
  counted during the first warm-up step with torch.utils.flop_counter, and the machine's peak with a
  large matmul in the same dtype, so the throughput reads as a fraction of peak (MFU).
- `--memory`: peak RSS of training steps under each memory lever (heads on all positions as before,
  masked heads, fused AdamW, the heap setting, activation checkpointing, updates applied inside
  backward), each variant in a separate process, with ratios to the first.
- `--compare-before`: the step as it was before issue 17 (heads over every position, torch's for-loop
  AdamW) and ours on the same weights, interleaved in one process (fp32 and bf16 autocast), with ratios.
- `--heap-timing`: the step's time with freed memory returned to the OS (the trainer's setting) against
  glibc's usual heap reuse, alternating step by step in one process.
- `--compare-reference PATH`: the reference implementation (a vilbert-multi-task checkout at PATH,
  imported from there, never copied) and ours, same sizes and batch, steps interleaved in one process
  (fp32 and bf16 autocast), with the ratios; with `--memory` its peak RSS runs as one more variant.

Examples:
    .venv/bin/python bench/bench_model.py                          # CPU, paper config, all 4 variants
    .venv/bin/python bench/bench_model.py --device cuda --steps 20 --warmup 5
    .venv/bin/python bench/bench_model.py --memory --steps 2       # one process per memory variant
    .venv/bin/python bench/bench_model.py --compare-reference ../vilbert-multi-task --steps 5
    .venv/bin/python bench/bench_model.py --config tiny --steps 5  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining  # noqa: E402
from vilbert_core.training.masking import mask_regions, mask_tokens  # noqa: E402
from vilbert_core.training.memory import return_freed_memory_to_os  # noqa: E402
from vilbert_core.training.optim import build_optimizer, step_in_backward  # noqa: E402
from vilbert_core.training.tasks import MaskingSpec, compute_losses  # noqa: E402

VARIANTS = ("sdpa-fp32", "eager-fp32", "sdpa-bf16", "eager-bf16")
# memory variant -> the levers it turns on, each variant in its own process
MEMORY_VARIANTS: dict[str, set[str]] = {
    "before": set(),  # the code before issue 17: heads over every position, torch's default AdamW
    "masked-heads": {"masked"},
    "fused-adamw": {"masked", "fused"},  # what the trainer runs now
    "heap": {"masked", "fused", "heap"},
    "checkpointing": {"masked", "fused", "heap", "checkpointing"},
    "in-backward": {"masked", "fused", "heap", "in_backward"},
    "in-backward+checkpointing": {"masked", "fused", "heap", "in_backward", "checkpointing"},
}
_MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "image_feat", "image_loc", "image_mask")
# token ids of the benchmark's made-up vocabulary: 0-3 special ([PAD], [CLS], [SEP], [UNK]), 4 [MASK]
_SPECIAL, _MASK_ID = (0, 1, 2, 3), 4


def make_batch(
    cfg: ViLBERTConfig, batch: int, tokens: int, regions: int, device: str
) -> dict[str, torch.Tensor]:
    """A random pretraining batch of the contract's shapes (region 0 = global [IMG] region), half aligned."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(batch, regions, cfg.v_target_size, generator=g)
    target = target / target.sum(-1, keepdim=True)
    batch_dict = {
        "input_ids": torch.randint(5, cfg.vocab_size, (batch, tokens), generator=g),
        "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "image_feat": torch.randn(batch, regions, cfg.v_feature_size, generator=g),
        "image_loc": torch.rand(batch, regions, 5, generator=g),
        "image_mask": torch.ones(batch, regions, dtype=torch.long),
        "image_target": target,
        "align_label": (torch.arange(batch) % 2 == 0).float(),
    }
    return {k: v.to(device) for k, v in batch_dict.items()}


def masking_spec(cfg: ViLBERTConfig, seed: int = 0) -> MaskingSpec:
    """Masking as the trainer does it, for the benchmark's vocabulary."""
    return MaskingSpec(_MASK_ID, cfg.vocab_size, _SPECIAL, torch.Generator().manual_seed(seed))


class AllPositionsHeads(torch.nn.Module):
    """Runs the MLM / MRM heads over every position, as the code did before issue 17 (a memory variant)."""

    def __init__(self, model: ViLBERTForPretraining) -> None:
        super().__init__()
        self.model = model

    def forward(self, mlm_positions: Any = None, mrm_positions: Any = None, **inputs: Any) -> Any:
        """The model's output with full (B,T,vocab) / (B,R,classes) logits; the positions are ignored."""
        return self.model(**inputs)


def pretraining_step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], masking: MaskingSpec) -> torch.Tensor:
    """The trainer's pretraining loss of one batch (masking, heads on the masked positions, three losses)."""
    return compute_losses(model, batch, "pretrain", masking)["loss"]


def reference_step_loss(
    ref: torch.nn.Module, batch: dict[str, torch.Tensor], masking: MaskingSpec, cfg: ViLBERTConfig
) -> torch.Tensor:
    """The reference model's three pretraining losses on the same masking of the same batch, summed."""
    from reference_code import reference_pretraining_inputs

    ids, mlm_labels = mask_tokens(batch["input_ids"], batch["attention_mask"], mask_token_id=masking.mask_token_id,
                                  vocab_size=cfg.vocab_size, special_token_ids=masking.special_token_ids,
                                  generator=masking.generator)  # fmt: skip
    feat, region_labels = mask_regions(batch["image_feat"], batch["image_mask"], generator=masking.generator)
    inputs = {**{k: batch[k] for k in _MODEL_INPUTS}, "input_ids": ids, "image_feat": feat}
    args = reference_pretraining_inputs(inputs, mlm_labels, region_labels, batch["image_target"], batch["align_label"])
    return sum(loss.sum() for loss in ref(**args)[:3])


def build_reference(path: str, cfg: ViLBERTConfig, device: str) -> torch.nn.Module:
    """The reference's BertForMultiModalPreTraining with our configuration's sizes."""
    from reference_code import load_reference, reference_config

    module = load_reference(path)
    return module.BertForMultiModalPreTraining(reference_config(module, cfg)).to(device).train()


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
            med = {impl: _median(t) for impl, t in times.items()}
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


def _median(values: list[float]) -> float:
    """The middle value (upper middle for an even count)."""
    return sorted(values)[len(values) // 2]


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


def _flops_of(fn: Callable[[], Any]) -> float:
    """FLOPs that fn() runs (matmuls and attention), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def run_precision(args: argparse.Namespace, precision: str, impls: list[str]) -> list[dict]:
    """Time training steps of one precision, alternating the attention paths step by step.

    Alternating (AB, BA, AB, ...) on one model in one process puts both paths under the same machine
    load, which matters on a shared CPU; each step's peak memory is measured in its own window.
    """
    device = args.device
    return_freed_memory_to_os()  # as the trainer does
    rss_start = _rss_bytes()  # torch alone holds ~0.7 GiB; the model's own memory is what comes on top
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset(args.config)
    model = ViLBERTForPretraining(cfg).to(device).train()
    step_model = torch.compile(model) if args.compile else model
    optimizer = build_optimizer(model, lr=1e-4)
    batch = make_batch(cfg, args.batch, args.tokens, args.regions, device)
    masking = masking_spec(cfg)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step(impl: str) -> tuple[float, int]:
        """One training step with the given attention path; returns (seconds, peak memory bytes)."""
        model.set_attn_implementation(impl)
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        with autocast:
            loss = pretraining_step_loss(step_model, batch, masking)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start, _peak(device)

    # the first warm-up step is counted: forward + backward FLOPs with the heads on the masked positions
    flops = _flops_of(lambda: step(impls[0])) / args.batch
    for i in range(args.warmup):
        for impl in impls[1:] if i == 0 else impls:
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
        median = _median(times[impl])
        rows.append(
            {
                "variant": f"{impl}-{precision}",
                "step_s_median": median,
                "step_s_all": times[impl],
                "samples_per_s": args.batch / median,
                "peak_memory_gib": peaks[impl] / 2**30,
                "peak_over_import_gib": (peaks[impl] - (rss_start if device == "cpu" else 0)) / 2**30,
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "model_flops_per_sample": flops,
            }
        )
    return rows


def run_memory_variant(args: argparse.Namespace, variant: str) -> dict:
    """Peak RSS and step time of fp32 training steps with one memory variant's levers (its own process)."""
    levers = MEMORY_VARIANTS.get(variant, set())
    if "heap" in levers:
        return_freed_memory_to_os()
    rss_import = _rss_bytes()
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset(args.config)
    batch = make_batch(cfg, args.batch, args.tokens, args.regions, "cpu")
    masking = masking_spec(cfg)
    if variant == "reference":
        model = build_reference(args.compare_reference, cfg, "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))

        def loss_of() -> torch.Tensor:
            return reference_step_loss(model, batch, masking, cfg)
    else:
        model = ViLBERTForPretraining(cfg).train()
        model.gradient_checkpointing_enable("checkpointing" in levers)
        if "fused" in levers:
            optimizer = build_optimizer(model, lr=1e-4)
        else:  # torch's default for CPU parameters: the for-loop kernel
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
        step_model = model if "masked" in levers else AllPositionsHeads(model)
        if "in_backward" in levers:
            step_in_backward(optimizer)

        def loss_of() -> torch.Tensor:
            return pretraining_step_loss(step_model, batch, masking)

    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss_of().backward()
        if "in_backward" not in levers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    # VmHWM over the whole process: model, the lazily created optimizer state, every step
    peak = _peak_rss_bytes()
    return {"variant": variant, "levers": sorted(levers), "peak_rss_mib": peak / 2**20,
            "peak_over_import_mib": (peak - rss_import) / 2**20, "import_rss_mib": rss_import / 2**20,
            "step_s_median": _median(times[args.warmup :] or times), "steps": len(times)}  # fmt: skip


def compare_steps(args: argparse.Namespace, other: str) -> list[dict]:
    """Our training step and another at fp32 and bf16 autocast, the four interleaved in this process.

    other: "reference", the reference code's model and loss (torch's AdamW); "before", this code's step
    before issue 17 on the same weights: heads over every position, torch's default (for-loop) AdamW.
    Each round runs the four (step, precision) arms once, in an order that rotates from round to round,
    so that all four see the same machine load. Rows: ours against the other at each precision, and
    ours at bf16 against the other at fp32 (the issue's bf16 target).
    """
    device = args.device
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset(args.config)
    ours = ViLBERTForPretraining(cfg).to(device).train()
    batch = make_batch(cfg, args.batch, args.tokens, args.regions, device)
    if other == "reference":
        ref = build_reference(args.compare_reference, cfg, device)
        other_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.98))

        def other_loss() -> torch.Tensor:
            return reference_step_loss(ref, batch, masking_spec(cfg), cfg)
    else:
        other_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.98))
        all_positions = AllPositionsHeads(ours)

        def other_loss() -> torch.Tensor:
            return pretraining_step_loss(all_positions, batch, masking_spec(cfg))

    steps: dict[str, tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]] = {
        "ours": (lambda: pretraining_step_loss(ours, batch, masking_spec(cfg)), build_optimizer(ours, lr=1e-4)),
        other: (other_loss, other_opt),
    }
    arms = [(name, precision) for precision in ("fp32", "bf16") for name in ("ours", other)]
    times: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms}
    for i in range(args.warmup + args.steps):
        for name, precision in arms[i % len(arms) :] + arms[: i % len(arms)]:  # a rotating order
            loss_of, opt = steps[name]
            autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
            _sync(device)
            start = time.perf_counter()
            with autocast:
                loss = loss_of()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= args.warmup:
                times[name, precision].append(time.perf_counter() - start)
    rows = []
    for ours_p, other_p in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")):
        a, b = times["ours", ours_p], times[other, other_p]
        rows.append({"precision": ours_p if ours_p == other_p else f"ours {ours_p} vs {other} {other_p}",
                     "other": other, "ours_samples_per_s": args.batch / _median(a),
                     "other_samples_per_s": args.batch / _median(b), "ratio": _median(b) / _median(a),
                     "ratio_per_round": [y / x for x, y in zip(a, b, strict=True)]})  # fmt: skip
    return rows


def heap_timing(args: argparse.Namespace) -> dict:
    """Step time with freed memory returned to the OS vs glibc's usual heap reuse, alternating in one process.

    The setting is the mmap threshold: 128 KiB fixed (return_freed_memory_to_os) against 32 MiB, where
    glibc's own rule ends after the first large frees. After each switch one step settles the heap and
    the next is timed. fp32, the trainer's step.
    """
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset(args.config)
    model = ViLBERTForPretraining(cfg).train()
    optimizer = build_optimizer(model, lr=1e-4)
    batch = make_batch(cfg, args.batch, args.tokens, args.regions, "cpu")
    masking = masking_spec(cfg)

    def step() -> float:
        start = time.perf_counter()
        pretraining_step_loss(model, batch, masking).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    settings = {"returned to the OS (128 KiB)": 128 * 1024, "glibc heap reuse (32 MiB)": 32 * 2**20}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.warmup):
        step()
    for i in range(args.steps):
        for name in settings if i % 2 == 0 else list(settings)[::-1]:
            return_freed_memory_to_os(settings[name])
            step()
            times[name].append(step())
    (a, ta), (b, tb) = times.items()
    row = {"times": times, "ratio": _median(ta) / _median(tb)}
    print(f"step: {a} {_median(ta):.2f} s, {b} {_median(tb):.2f} s, ratio {row['ratio']:.2f} "
          f"(per round {', '.join(f'{x / y:.2f}' for x, y in zip(ta, tb, strict=True))})", flush=True)  # fmt: skip
    return {"heap_timing": row}


def _child(args: argparse.Namespace, flag: str, value: str) -> Any:
    """Run this script again with --<flag> value; its last stdout line is JSON (None after a failure)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], f"--{flag}", value]  # the child ignores --out
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # record the failure and go on with the other variants
        print(f"{value} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_info(device: str) -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, torch, threads, load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),  # other work on a shared machine skews every figure
    }


def main_memory(args: argparse.Namespace) -> dict:
    """Each memory variant (and the reference, when given) in its own process; ratios to the first."""
    names = args.memory_variants.split(",") + (["reference"] if args.compare_reference else [])
    rows = [row for name in names if (row := _child(args, "memory-child", name)) is not None]
    base = rows[0]["peak_rss_mib"] if rows else float("nan")
    print(f"| variant | levers | peak RSS | over import | vs {names[0]} | step (median) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        row["ratio_to_first"] = row["peak_rss_mib"] / base
        print(f"| {row['variant']} | {', '.join(row['levers']) or '-'} | {row['peak_rss_mib']:.0f} MiB | "
              f"{row['peak_over_import_mib']:.0f} MiB | {row['ratio_to_first']:.2f} | {row['step_s_median']:.2f} s |",
              flush=True)  # fmt: skip
    return {"memory": rows}


def main_compare(args: argparse.Namespace, other: str) -> dict:
    """Print the interleaved training-step ratios of ours against `other` (see compare_steps)."""
    rows = compare_steps(args, other)
    for row in rows:
        print(f"{row['precision']}: ours {row['ours_samples_per_s']:.2f} samples/s, {other} "
              f"{row['other_samples_per_s']:.2f} samples/s, ratio {row['ratio']:.2f}x "
              f"(per round {', '.join(f'{r:.2f}' for r in row['ratio_per_round'])})", flush=True)  # fmt: skip
    return {f"compare_{other}": rows}


def main() -> None:
    """Parse options, run the chosen mode, print a table and optionally write JSON."""
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
    parser.add_argument("--memory", action="store_true", help="peak RSS per memory variant, one process each (CPU)")
    parser.add_argument("--memory-variants", default=",".join(MEMORY_VARIANTS),
                        help=f"comma list from {tuple(MEMORY_VARIANTS)}; the first is the base of the ratios")  # fmt: skip
    parser.add_argument("--compare-reference", default=None, metavar="PATH",
                        help="a vilbert-multi-task checkout: time its training step against ours, interleaved")  # fmt: skip
    parser.add_argument("--compare-before", action="store_true",
                        help="time the step before issue 17 (heads over every position, for-loop AdamW) against ours")  # fmt: skip
    parser.add_argument("--heap-timing", action="store_true",
                        help="step time with freed memory returned to the OS vs glibc's heap reuse, alternating (CPU)")  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.child:  # one precision, its rows as one JSON line on stdout
        precision, impls = args.child.split(":")
        print(json.dumps(run_precision(args, precision, impls.split(","))))
        return
    if args.memory_child:
        print(json.dumps(run_memory_variant(args, args.memory_child)))
        return
    for name in args.memory_variants.split(","):
        if name not in MEMORY_VARIANTS:
            parser.error(f"unknown memory variant {name!r}; choose from {tuple(MEMORY_VARIANTS)}")
    info: dict[str, Any] = machine_info(args.device) | {
        "device": args.device, "config": args.config, "batch": args.batch, "tokens": args.tokens,
        "regions": args.regions, "steps": args.steps, "warmup": args.warmup,
    }  # fmt: skip
    print(f"machine: {info['machine']}, torch {info['torch']}, {info['torch_threads']} threads, "
          f"load average {info['load_average'][0]:.1f} at the start", flush=True)  # fmt: skip
    if args.memory:
        info |= main_memory(args)
    elif args.compare_reference:
        info |= main_compare(args, "reference")
    elif args.compare_before:
        info |= main_compare(args, "before")
    elif args.heap_timing:
        info |= heap_timing(args)
    else:
        info |= main_variants(args, parser)
    info["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2) + "\n")


def main_variants(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The attention-path x precision variants (and the attention micro-benchmark)."""
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
        return {"attention": attention}

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
        rows = _child(args, "child", f"{precision}:{','.join(impls)}")
        if rows is None:
            results.append({"variant": precision, "error": "failed (see stderr)"})
            continue
        for row in rows:
            row["achieved_flops_per_s"] = row["model_flops_per_sample"] * row["samples_per_s"]
            row["mfu_vs_measured_matmul_peak"] = row["achieved_flops_per_s"] / peaks[precision]
            results.append(row)
            print(
                f"{row['variant']:11s} {row['samples_per_s']:8.2f} samples/s  step {row['step_s_median']:.3f} s  "
                f"peak {row['peak_memory_gib']:.2f} GiB (+{row['peak_over_import_gib']:.2f} over import)  "
                f"MFU {100 * row['mfu_vs_measured_matmul_peak']:.1f}%  "
                f"({row['model_flops_per_sample'] / 1e9:.1f} GFLOP/sample)",
                flush=True,
            )
    print(f"matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    return {"matmul_peak_flops_per_s": peaks, "matmul_peak_size": n, "results": results, "attention": attention}


if __name__ == "__main__":
    main()
