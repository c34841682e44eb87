"""Checkpoint formats of the ViLBERT models: save_pretrained / from_pretrained and BERT initialisation.

`modeling.py` defines the models and calls these: the files a folder holds (`model.safetensors` +
`config.json`, or a reference `pytorch_model.bin`), reading state dicts safely (safetensors, or torch
with weights_only), renaming reference and Hugging Face BERT tensors (`convert.py`), and copying them
into a model with a report of what was loaded, skipped or left fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ViLBERTConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
REFERENCE_WEIGHTS_NAME = "pytorch_model.bin"


@dataclass
class LoadReport:
    """What from_pretrained / init_text_from_bert did with each tensor."""

    source: str
    source_format: str  # "project", "reference" or "bert"
    loaded: list[str] = field(default_factory=list)  # our parameter names that received a tensor
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint name -> why it was not used
    fresh: list[str] = field(default_factory=list)  # our parameters left at their initial values

    def summary(self) -> str:
        """One line per category, for logs."""
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.source_format} format)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} checkpoint tensors:")
            lines += [f"  {k}: {why}" for k, why in sorted(self.skipped.items())]
        if self.fresh:
            lines.append(
                f"{len(self.fresh)} parameters start fresh (not in the checkpoint): " + ", ".join(self.fresh)
            )
        return "\n".join(lines)


def copy_tensors(own: dict[str, Tensor], usable: dict[str, Tensor]) -> list[str]:
    """Copy checked tensors into the model's state (a state_dict(), which shares its storage); sorted names."""
    with torch.no_grad():
        for name, tensor in usable.items():
            own[name].copy_(tensor)
    return sorted(usable)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load tensors from a .safetensors file or a torch state dict (weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint {path} could not be read as safetensors: {err}") from err
    from .torch_files import load_torch_file

    state = load_torch_file(path)  # one-line ValueError naming the file and, for a malicious pickle, its call
    # some training scripts wrap the state dict; unwrap the common containers
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    return state


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(weights file, config.json path) for a directory or a weights file."""
    if path.is_dir():
        for name in (WEIGHTS_NAME, REFERENCE_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name, path / CONFIG_NAME
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor {REFERENCE_WEIGHTS_NAME}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path, path.parent / CONFIG_NAME


# ----------------------------------------------------------------------------- saving and loading
def save_pretrained(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Write config.json and model.safetensors (tied copies dropped) atomically into directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if name not in model._tied_weights
    }
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "model_class": type(model).__name__})
    os.replace(tmp, directory / WEIGHTS_NAME)
    model.config.to_json_file(directory / CONFIG_NAME)


def load_pretrained(
    cls: type,
    path: str | os.PathLike[str],
    config: ViLBERTConfig | None = None,
    *,
    num_answers: int | None = None,
    output_loading_info: bool = False,
    reference_answer_head: str = "vil_prediction",
    **config_overrides: Any,
) -> Any:
    """Load a save_pretrained directory, a model.safetensors file or a reference pytorch_model.bin.

    config: used as is when given; otherwise config.json beside the weights (project or reference
    format); a reference checkpoint without one gets the paper preset. num_answers and other keyword
    arguments override config fields. Returns the model in eval mode, or (model, LoadReport) when
    output_loading_info is true.
    """
    from .convert import (
        convert_reference_state_dict,
        is_project_state_dict,
        reference_head_sizes,
        strip_wrapper_prefixes,
    )

    weights, config_file = resolve_checkpoint(Path(path))
    if config is None:
        if config_file.is_file():
            config = ViLBERTConfig.from_json_file(config_file)
        elif weights.suffix == ".safetensors":
            raise FileNotFoundError(
                f"{config_file} is missing; pass config= or restore the saved config.json"
            )
        else:
            logger.warning("no config.json beside %s; using the paper preset 'vilbert-base'", weights)
            config = ViLBERTConfig.preset("vilbert-base")
    if num_answers is not None:
        config_overrides["num_answers"] = num_answers
    raw = read_state_dict(weights)
    reference = not is_project_state_dict(raw)
    if reference and "gqa_head." in cls._head_prefixes and not config.num_gqa_answers:
        # the multi-task reference's second answer head gets a home, so that no tensor of it is dropped
        config_overrides = {**reference_head_sizes(raw, reference_answer_head), **config_overrides}
    # a copy even without overrides: the model must never share a caller's config object
    config = dataclasses.replace(config, **config_overrides)

    model = cls(config)
    if not reference:
        # DistributedDataParallel / torch.compile wrappers prefix every name; the names below are ours
        origin = {strip_wrapper_prefixes(k): k for k in raw}
        state = {name: raw[k] for name, k in origin.items()}
        skipped, fmt = {}, "project"
    else:
        state, skipped, origin = convert_reference_state_dict(raw, answer_head=reference_answer_head)
        fmt = "reference"
    report = load_mapped(model, state, skipped, origin, source=str(weights), source_format=fmt)
    if report.skipped:
        logger.warning("%s", report.summary())
    elif report.fresh:
        logger.warning("task heads start fresh: %s", ", ".join(report.fresh))
    model.eval()
    return (model, report) if output_loading_info else model


def load_mapped(
    model: nn.Module,
    state: dict[str, Tensor],
    skipped: dict[str, str],
    origin: dict[str, str],
    *,
    source: str,
    source_format: str,
) -> LoadReport:
    """Copy tensors already named as our parameters; raise on missing or mis-shaped ones.

    origin maps our name -> the checkpoint's name, so that reports and errors quote the source name.
    """
    own = model.state_dict()
    report = LoadReport(source=source, source_format=source_format, skipped=dict(skipped))
    mismatched = []
    usable: dict[str, Tensor] = {}
    for name, tensor in state.items():
        source_name = origin.get(name, name)
        if name not in own:
            report.skipped[source_name] = f"not a parameter of {type(model).__name__}"
        elif name in model._tied_weights:
            report.skipped[source_name] = f"tied to {model._tied_weights[name]}"
        elif tuple(tensor.shape) != tuple(own[name].shape):
            renamed = f" (checkpoint name {source_name})" if source_name != name else ""
            mismatched.append(
                f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)}{renamed}"
            )
        else:
            usable[name] = tensor
    missing = [n for n in own if n not in state and n not in model._tied_weights]
    fresh = [n for n in missing if n.startswith(model._head_prefixes)]
    absent = [n for n in missing if n not in fresh]
    if mismatched or absent:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} tensors with the wrong shape: " + "; ".join(mismatched))
        if absent:
            problems.append(f"{len(absent)} parameters missing from the checkpoint: " + ", ".join(absent))
        raise ValueError(f"cannot load {source} into {type(model).__name__}: " + " | ".join(problems))
    report.loaded = copy_tensors(own, usable)
    report.fresh = fresh
    return report


# ----------------------------------------------------------------------------- BERT initialisation
def init_text_from_bert(model: nn.Module, hf_bert_dir: str | os.PathLike[str]) -> LoadReport:
    """Copy a Hugging Face BERT folder's embeddings, layers (and MLM head) into the text stream, as the paper does."""
    from .convert import convert_bert_state_dict

    # a Hugging Face folder stores its weights under the same two names as ours and the reference's
    weights, _ = resolve_checkpoint(Path(hf_bert_dir))
    state, skipped = convert_bert_state_dict(read_state_dict(weights))
    own = model.state_dict()
    report = LoadReport(source=str(weights), source_format="bert", skipped=skipped)
    problems = []
    usable: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name not in own and name.startswith("mlm_head."):
            report.skipped[name] = f"{type(model).__name__} has no MLM head"
        elif name not in own:
            problems.append(f"{name} (BERT has more layers than the model)")
        elif name in model._tied_weights:
            report.skipped[name] = f"tied to {model._tied_weights[name]}"
        elif tuple(tensor.shape) != tuple(own[name].shape):
            problems.append(f"{name}: BERT {tuple(tensor.shape)} vs model {tuple(own[name].shape)}")
        else:
            usable[name] = tensor
    text_stream = ("vilbert.embeddings.", "vilbert.text_layers.")
    missing = [n for n in own if n.startswith(text_stream) and n not in usable]
    if missing:
        problems.append("text-stream parameters absent from BERT: " + ", ".join(missing))
    if problems:
        raise ValueError(f"cannot initialise the text stream from {weights}: " + "; ".join(problems))
    report.loaded = copy_tensors(own, usable)
    return report
