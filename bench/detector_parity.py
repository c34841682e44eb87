"""Does our detector compute what the public pure-PyTorch port computes, from the same checkpoint?

The port is Hugging Face's LXMERT-demo Faster R-CNN ("unc-nlp/frcnn-vg-finetuned": transformers'
examples/research_projects/lxmert/modeling_frcnn.py and utils.py), whose `pytorch_model.bin` is one of
the three checkpoint formats `vilbert-data extract --weights` reads. PATH is a folder holding those
two files, imported from there and never copied into this repository.

The script builds the port's GeneralizedRCNN (ResNet-101 C4, the VG configuration) with random weights,
also randomising every BatchNorm's statistics and affine parameters (the port's init leaves them at
0 / 1, which would hide a wrong conversion), saves its state dict as a `pytorch_model.bin`, loads that
file with `Detector.from_checkpoint` (format detection, background column moved first, box-delta
weights folded in, BatchNorm fused into the convolutions) and runs both on the same input tensor:

- the backbone's res4 map;
- the RPN head's objectness logits and box deltas;
- the RPN proposals (NMS 0.7, 300 kept), with the port's minimum proposal size set to the Caffe
  rule's 16 px x scale that ours applies (its public config has 0; with 0 the two differ only by
  degenerate 1-pixel boxes past the right or bottom edge, which Caffe's clip to W-1 keeps and the
  continuous clip to W empties), and every anchor taken before NMS: same boxes in the same order,
  ours in the Caffe "+1" convention (x2, y2 one less). At the usual 6000 before NMS the two differ
  by design: Caffe's proposal layer drops the small boxes and then takes the best 6000 (ours too),
  the port takes the best 6000 and then drops the small ones, so fewer remain; printed as
  information;
- the box head on the port's proposals passed to ours as they are: the 2048-d pooled feature, the
  1601-way class distribution (background column first in ours, last in the port) and the 401-way
  attribute distribution. Passed in ours' own convention instead (x2, y2 one less, what `extract`
  does), the pooled region is one input pixel smaller at the right and bottom: the port hands its
  continuous boxes to an inclusive-end RoIPool, Caffe (and ours) hands it "+1" boxes. That
  difference is printed too, as information.

    .venv/bin/python bench/detector_parity.py --hf-port ../lxmert_frcnn
    .venv/bin/python bench/detector_parity.py --hf-port ../lxmert_frcnn --depth 50 --size 224
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.config import DetectorConfig  # noqa: E402
from extract.detector import Detector  # noqa: E402


def port_config(depth: int, min_size: int, max_size: int) -> dict[str, Any]:
    """The keys the port reads, with the VG detector's settings (shared/reference/detector.md)."""
    return {
        "MAX_DETECTIONS": 36, "MIN_DETECTIONS": 10, "PAD_VALUE": 0.0, "SIZE_DIVISIBILITY": 0,
        "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": min_size, "MAX_SIZE_TEST": max_size},
        "MODEL": {"DEVICE": "cpu", "MAX_POOL": True, "PIXEL_MEAN": [102.9801, 115.9465, 122.7717],
                  "PIXEL_STD": [1.0, 1.0, 1.0], "LOAD_PROPOSALS": False, "CHKPOINT": ""},
        "BACKBONE": {"FREEZE_AT": 2},
        "RESNETS": {"DEPTH": depth, "NORM": "BN", "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "STEM_OUT_CHANNELS": 64,
                    "RES2_OUT_CHANNELS": 256, "STRIDE_IN_1X1": True, "RES5_DILATION": 1, "OUT_FEATURES": ["res4"]},
        "ANCHOR_GENERATOR": {"SIZES": [[64, 128, 256, 512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]], "OFFSET": 0.0},
        "PROPOSAL_GENERATOR": {"HIDDEN_CHANNELS": 512, "MIN_SIZE": 0.0},
        "RPN": {"IN_FEATURES": ["res4"], "PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 300, "NMS_THRESH": 0.7,
                "PRE_NMS_TOPK_TRAIN": 12000, "POST_NMS_TOPK_TRAIN": 2000, "BATCH_SIZE_PER_IMAGE": 256,
                "POSITIVE_FRACTION": 0.5, "SMOOTH_L1_BETA": 0.0, "LOSS_WEIGHT": 1.0, "BOUNDARY_THRESH": -1,
                "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0], "IOU_THRESHOLDS": [0.3, 0.7], "IOU_LABELS": [0, -1, 1]},
        "ROI_HEADS": {"IN_FEATURES": ["res4"], "NUM_CLASSES": 1600, "SCORE_THRESH_TEST": 0.2, "NMS_THRESH_TEST": 0.3,
                      "POSITIVE_FRACTION": 0.25, "PROPOSAL_APPEND_GT": True, "IOU_THRESHOLDS": [0.5], "IOU_LABELS": [0, 1]},
        "ROI_BOX_HEAD": {"POOLER_RESOLUTION": 14, "POOLER_SAMPLING_RATIO": 0, "RES5HALVE": False, "ATTR": True,
                         "NUM_ATTRS": 400, "CLS_AGNOSTIC_BBOX_REG": False, "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
                         "SMOOTH_L1_BETA": 0.0, "NUM_FC": 0, "NUM_CONV": 0, "FC_DIM": 1024, "CONV_DIM": 256},
    }  # fmt: skip


def load_port(path: str) -> types.ModuleType:
    """The port's modeling_frcnn module, imported from PATH (its utils imports cv2 and wget, which only
    its image-loading and download helpers use: absent, they are replaced by empty modules)."""
    root = Path(path).resolve()
    if not (root / "modeling_frcnn.py").is_file() or not (root / "utils.py").is_file():
        raise SystemExit(f"--hf-port {path}: expected modeling_frcnn.py and utils.py there")
    for name in ("cv2", "wget"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(root))
    return importlib.import_module("modeling_frcnn")


def randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm other statistics and affine parameters than the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, that over the larger tensor's largest magnitude)."""
    a, b = a.double(), b.double()
    d = (a - b).abs().max().item() if a.numel() else 0.0
    return d, d / max(a.abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0, 1e-30)


@torch.no_grad()
def compare(port_path: str, depth: int, size: int, seed: int) -> dict[str, Any]:
    """Build, save, load, run; the differences per stage."""
    frcnn = load_port(port_path)
    utils = importlib.import_module("utils")
    torch.manual_seed(seed)
    port = frcnn.GeneralizedRCNN(utils.Config(port_config(depth, size, max(size, 1000)))).eval()
    randomise_norms(port, seed)
    config = replace(DetectorConfig(), depth=depth, min_size=size, max_size=max(size, 1000))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(port.state_dict(), Path(tmp) / "pytorch_model.bin")
        ours = Detector.from_checkpoint(Path(tmp) / "pytorch_model.bin", device="cpu", config=config)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    batch = ours.preprocess([image])
    x = batch.tensor  # the same BGR, mean-subtracted, resized input for both
    h, w = batch.input_sizes[0]

    res4_port = port.backbone(x)["res4"]
    res4_ours = ours.backbone_features(batch)
    rows: dict[str, Any] = {"res4 map": _rel(res4_ours, res4_port)}

    logits_port, deltas_port = (t[0] for t in port.proposal_generator.rpn_head([res4_port]))
    logits_ours, deltas_ours = ours.model.proposal_generator.rpn_head(res4_ours)
    rows["RPN objectness logits"] = _rel(logits_ours, logits_port)
    rows["RPN box deltas"] = _rel(deltas_ours, deltas_port)

    gen = port.proposal_generator
    gen.min_box_side_len = config.rpn_min_size * batch.scales[0]  # the Caffe rule's minimum, as ours
    plus_one = torch.tensor([0.0, 0.0, 1.0, 1.0])  # ours keep Caffe's +1 convention: x2, y2 one less
    default_ours = ours.proposals(res4_ours, batch)[0] + plus_one
    default_port = gen(x, torch.tensor([[h, w]]), {"res4": res4_port})[0][0]
    # the mechanics with every anchor before NMS: the order of "take the best 6000" and "drop small
    # boxes" then does not matter (Caffe drops first, the port takes first: the info row below)
    gen.pre_nms_topk[False] = 10**9
    ours.config = replace(ours.config, pre_nms_topk=10**9)
    props_port = gen(x, torch.tensor([[h, w]]), {"res4": res4_port})[0][0]
    props_ours = ours.proposals(res4_ours, batch)[0] + plus_one
    ours.config = config
    rows["RPN proposals, every anchor before NMS: count (ours, port)"] = (props_ours.shape[0], props_port.shape[0])
    if props_ours.shape[0] == props_port.shape[0]:
        # as sets: scores that differ in the 6th digit may swap two proposals of nearly equal score
        d = torch.cdist(props_ours.double(), props_port.double(), p=float("inf")).min(dim=1).values.max().item()
        rows["RPN proposals, every anchor before NMS (each to its nearest)"] = (d, d / props_port.abs().max().item())
        rank = torch.cdist(props_ours.double(), props_port.double(), p=float("inf")).argmin(dim=1)
        moved = (rank != torch.arange(len(rank))).sum().item()
        rows["RPN proposals, every anchor before NMS: ranks that differ"] = f"{moved} of {len(rank)}"
    near = torch.cdist(default_ours.double(), default_port.double(), p=float("inf")) < 1e-2
    rows["info: proposals shared at the default 6000 before NMS"] = f"{int(near.any(1).sum())} of {len(default_ours)}"

    # the box head on the port's proposals as they are: both pool the same cells
    cls_port, attr_port, _, feat_port = port.roi_heads({"res4": res4_port}, [props_port])
    head = ours.box_head(res4_ours, [props_port])
    rows["box feature (2048-d)"] = _rel(head.res5, feat_port)
    rows["class distribution (1601)"] = _rel(head.cls_prob, cls_port.softmax(-1).roll(1, dims=1))
    rows["attribute distribution (401)"] = _rel(head.attr_prob, attr_port.softmax(-1).roll(1, dims=1))
    rows["class argmax agrees"] = float((head.cls_prob.argmax(1) == cls_port.roll(1, dims=1).argmax(1)).float().mean())
    caffe = ours.box_head(res4_ours, [props_port - torch.tensor([0.0, 0.0, 1.0, 1.0])])
    rows["info: box feature with Caffe's box convention (not a failure)"] = _rel(caffe.res5, feat_port)
    return rows


def main() -> None:
    """Print the table; exit 1 when a stage differs beyond the tolerance."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-port", required=True, metavar="PATH", help="folder with the port's modeling_frcnn.py and utils.py")
    ap.add_argument("--depth", type=int, default=101, choices=[50, 101])
    ap.add_argument("--size", type=int, default=600, help="the input's short side (the original: 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference accepted")
    a = ap.parse_args()
    rows = compare(a.hf_port, a.depth, a.size, a.seed)
    print(f"ResNet-{a.depth} C4, a random 400x300 image at short side {a.size}, fp32, torch {torch.__version__}\n")
    print("| stage | max abs diff | max rel diff |\n|---|---|---|")
    worst = 0.0
    for name, value in rows.items():
        if isinstance(value, tuple) and isinstance(value[0], float):
            if not name.startswith("info:"):
                worst = max(worst, value[1])
            print(f"| {name} | {value[0]:.2e} | {value[1]:.2e} |")
        else:
            print(f"| {name} | {value} | |")
    counts = rows["RPN proposals, every anchor before NMS: count (ours, port)"]
    ok = worst <= a.tolerance and counts[0] == counts[1] and rows["class argmax agrees"] == 1.0
    print(f"\nlargest relative difference {worst:.2e} (tolerance {a.tolerance:.0e}): {'SAME' if ok else 'DIFFERENT'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
