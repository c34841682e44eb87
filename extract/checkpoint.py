"""Loaders for the three public bottom-up-attention checkpoints, normalised to one set of conventions.

| format    | file                                   | container                          |
|-----------|----------------------------------------|------------------------------------|
| d2_pkl    | faster_rcnn_from_caffe_attr.pkl        | pickle {"model": {name: ndarray}}  |
| hf_bin    | pytorch_model.bin (frcnn-vg-finetuned) | torch state dict                   |
| caffe_pth | bua-caffe-frcn-r101-k10-100.pth / k36  | torch state dict, maybe in "model" |

The model (`extract.modeling`) uses detectron2 names with: background / "no attribute" in row 0 (Caffe
order), one objectness logit per anchor, +1-style anchors where row k belongs to RPN channel k, and
bbox_pred as 1601 x 4 unweighted rows. Pickles go through an unpickler that admits only numpy arrays
and plain containers; torch files through torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .boxes import caffe_anchors, detectron2_anchors
from .config import RES4_BLOCKS

logger = logging.getLogger(__name__)

FORMATS = ("d2_pkl", "hf_bin", "caffe_pth")
D2_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is refused, or does not fit the model."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays, numpy scalars and plain Python containers."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("collections", "OrderedDict"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
        }
    )

    def find_class(self, module: str, name: str) -> object:
        """Resolve a global only if it is on the allow-list."""
        if (module, name) in self.ALLOWED or (module.startswith("numpy") and name.startswith("dtype")):
            return super().find_class(module, name)
        raise CheckpointError(
            f"refusing to unpickle global '{module}.{name}': this loader only admits numpy arrays and plain "
            "containers (a pickle that references other callables could run code)"
        )

    def persistent_load(self, pid: object) -> object:
        """Refuse persistent ids (used by torch files, never by plain numpy pickles)."""
        raise CheckpointError("refusing a pickle with persistent ids (not a plain numpy pickle)")


def safe_pickle_loads(data: bytes) -> object:
    """Unpickle bytes with SafeUnpickler (latin1 for pickles written by Python 2)."""
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except CheckpointError:
        raise
    except Exception as e:  # any parse error of a hostile or damaged file
        raise CheckpointError(f"cannot unpickle: {type(e).__name__}: {e}") from e


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_tensor(value: object) -> torch.Tensor | None:
    """numpy array or tensor -> float32 (or int) CPU tensor; None for non-array entries."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    elif isinstance(value, np.ndarray):
        t = torch.from_numpy(np.array(value, copy=True))
    elif isinstance(value, np.generic):
        t = torch.tensor(value.item())
    else:
        return None
    return t.float() if t.is_floating_point() else t


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint file -> (flat name -> tensor dict, container "pickle" or "torch")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if zipfile.is_zipfile(path):
        obj, container = _torch_load(path), "torch"
    else:
        obj = safe_pickle_loads(path.read_bytes())
        container = "pickle"
        # pre-1.6 torch.save layout: a pickled magic number comes first (type check: `==` on an array is no bool)
        if type(obj) is int and obj == _TORCH_LEGACY_MAGIC:
            obj, container = _torch_load(path), "torch"
    state = obj
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict of tensors, found {type(state).__name__}")
    tensors = {}
    for name, value in state.items():
        t = _to_tensor(value)
        if t is not None:
            tensors[str(name)] = t
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    if not tensors:
        raise CheckpointError(f"checkpoint {path}: holds no tensors")
    return tensors, container


def _torch_load(path: Path) -> object:
    """torch.load restricted to tensors and containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path}: refused by torch.load(weights_only=True): {e}") from e
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path}: cannot read as a torch file: {type(e).__name__}: {e}"
        ) from e


def detect_format(state: dict[str, torch.Tensor], container: str) -> str:
    """Which of FORMATS a raw state dict is, from its names, shapes and container."""
    obj = state.get("proposal_generator.rpn_head.objectness_logits.weight")
    if any(".box_predictor.attr_linear1." in k for k in state) or (obj is not None and obj.shape[0] == 24):
        return "caffe_pth"
    return "d2_pkl" if container == "pickle" else "hf_bin"


def _roll_background_first(t: torch.Tensor) -> torch.Tensor:
    """Rows in background-last order -> Caffe order (background row first)."""
    return torch.roll(t, shifts=1, dims=0)


def normalise_state(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Map a raw state dict of format `fmt` to the model's names and conventions."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    out = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    p = "roi_heads.box_predictor."
    if fmt == "caffe_pth":
        renames = {
            "cls_embed.": "cls_embedding.",
            "attr_linear1.": "fc_attr.",
            "attr_linear2.": "attr_score.",
        }
        for old, new in renames.items():
            for k in [k for k in out if k.startswith(p + old)]:
                out[p + new + k[len(p + old) :]] = out.pop(k)
        for suffix in ("weight", "bias"):
            k = f"proposal_generator.rpn_head.objectness_logits.{suffix}"
            if k in out and out[k].shape[0] == 24:
                # Pairwise softmax over (background, foreground) == sigmoid(fg - bg).
                out[k] = out[k][12:] - out[k][:12]
        if ANCHORS_KEY not in out:
            out[ANCHORS_KEY] = caffe_anchors()
        return out

    # detectron2 conventions (d2_pkl and hf_bin): background / "no attribute" last, weighted deltas.
    for k in (
        p + "cls_score.weight",
        p + "cls_score.bias",
        p + "cls_embedding.weight",
        p + "attr_score.weight",
        p + "attr_score.bias",
    ):
        if k in out:
            out[k] = _roll_background_first(out[k])
    weights = torch.tensor(D2_BOX_WEIGHTS)
    for suffix in ("weight", "bias"):
        k = p + f"bbox_pred.{suffix}"
        if k in out and out[k].shape[0] % 4 == 0:
            rows = out[k].reshape(-1, 4, *out[k].shape[1:])  # (classes, 4, ...)
            w = weights.view(1, 4, *([1] * (rows.dim() - 2)))
            rows = torch.cat(
                [torch.zeros_like(rows[:1]), rows / w], dim=0
            )  # background rows first, unweighted
            out[k] = rows.reshape(-1, *out[k].shape[1:])
    anchors = out.get(ANCHORS_KEY)
    if anchors is None:
        anchors = detectron2_anchors()  # what detectron2 generates: size-major, matching its RPN channels
    anchors = anchors.clone().float()
    anchors[:, 2:] -= 1.0  # continuous -> +1 style (identical decoded boxes, clip and IoU)
    out[ANCHORS_KEY] = anchors
    return out


def infer_depth(state: dict[str, torch.Tensor]) -> int | None:
    """ResNet depth from the number of res4 blocks (6 -> 50, 23 -> 101), None if neither."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.res4\.(\d+)\.", k))}
    return {n: depth for depth, n in RES4_BLOCKS.items()}.get(len(blocks))


def _listing(items: list[str], sep: str) -> str:
    """The first _MAX_LISTED items joined by sep, then how many more there are."""
    text = sep.join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        text += f"{sep}... ({len(items) - _MAX_LISTED} more)"
    return text


@dataclass
class LoadedCheckpoint:
    """A checkpoint in the model's conventions, with its provenance."""

    state: dict[str, torch.Tensor]
    format: str
    sha256: str
    depth: int | None
    path: str

    def load_into(self, model: nn.Module) -> None:
        """Copy the tensors into `model`; fail listing every missing or mis-shaped tensor."""
        expected = model.state_dict()
        missing = sorted(k for k in expected if k not in self.state)
        misshaped = sorted(
            f"{k}: checkpoint {tuple(self.state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in expected
            if k in self.state and self.state[k].shape != expected[k].shape
        )
        unexpected = sorted(k for k in self.state if k not in expected)
        if missing or misshaped:
            depth = infer_depth(expected) or "?"
            parts = [f"checkpoint {self.path} ({self.format}) does not fit the detector (depth {depth}):"]
            if missing:
                parts.append(f"{len(missing)} missing tensors: " + _listing(missing, ", "))
            if misshaped:
                parts.append(f"{len(misshaped)} tensors with the wrong shape: " + _listing(misshaped, "; "))
            raise CheckpointError("\n  ".join(parts))
        if unexpected:
            logger.warning(
                "checkpoint %s: ignoring %d unused tensors: %s", self.path, len(unexpected), unexpected[:10]
            )
        model.load_state_dict({k: self.state[k].to(expected[k].dtype) for k in expected}, strict=True)


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read any of the three formats, detect which, and normalise it to the model's conventions."""
    raw, container = read_state_dict(path)
    fmt = detect_format(raw, container)
    state = normalise_state(raw, fmt)
    logger.info("loaded %s checkpoint %s (%d tensors)", fmt, path, len(raw))
    return LoadedCheckpoint(
        state=state, format=fmt, sha256=file_sha256(path), depth=infer_depth(state), path=str(path)
    )
