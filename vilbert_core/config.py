"""ViLBERT configuration: one dataclass, presets, and readers for the reference and project JSON files."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.config import CLS_PROB_DIM
from pipelines.fileio import atomic_write_json

# Values the reference code (vilbert-multi-task `BertConfig.__init__`) uses for keys missing from its JSON.
# They differ from the paper configuration on purpose: a reference JSON that omits a key gets what the
# reference would have built, not what the paper used.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "v_feature_size": 2048,
    "v_target_size": CLS_PROB_DIM,
    "v_hidden_size": 768,
    "v_num_hidden_layers": 3,
    "v_num_attention_heads": 12,
    "v_intermediate_size": 3072,
    "bi_hidden_size": 1024,
    "bi_num_attention_heads": 16,
    "v_attention_probs_dropout_prob": 0.1,
    "v_hidden_act": "gelu",
    "v_hidden_dropout_prob": 0.1,
    "v_biattention_id": [0, 1],
    "t_biattention_id": [10, 11],
    "fusion_method": "mul",
    "with_coattention": True,
}

# Marker written into the project's own config.json so that it is never mistaken for a reference file.
PROJECT_FORMAT = "vilbert-data/model"

_ACTIVATIONS = ("gelu", "relu", "swish", "gelu_new")
FEATURE_NORMS = ("none", "standardize")


@dataclass
class ViLBERTConfig:
    """Sizes and options of a two-stream ViLBERT; the defaults are the paper configuration."""

    # text stream (BERT-base uncased)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    # visual stream
    v_feature_size: int = 2048
    v_target_size: int = CLS_PROB_DIM
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_hidden_act: str = "gelu"
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    # "standardize": the region embedding first subtracts the training features' per-dimension mean and
    # divides by their std (buffers feature_mean / feature_std, set by the trainer from the shards'
    # feature_stats.json). "none": raw features, as the reference and its released checkpoints.
    v_feature_norm: str = "none"
    # co-attention
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    with_coattention: bool = True
    fusion_method: str = "mul"
    # heads and numerics
    num_answers: int = 3129
    # multi-task training (12-in-1's --task_specific_tokens): the tasks that have a learned task embedding,
    # added to the [CLS] input embedding of their examples (docs/deviations.md); empty: none
    task_tokens: list[str] = field(default_factory=list)
    # a second answer classifier for GQA beside vqa_head, as the multi-task reference holds (its
    # vil_prediction_gqa, 1533 answers); 0: none. Tasks train vqa_head; this keeps a converted model whole.
    num_gqa_answers: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        self.v_biattention_id = [int(i) for i in self.v_biattention_id]
        self.t_biattention_id = [int(i) for i in self.t_biattention_id]
        self.task_tokens = [str(name) for name in self.task_tokens]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        problems = []
        if len(self.v_biattention_id) != len(self.t_biattention_id):
            problems.append(
                f"v_biattention_id {self.v_biattention_id} and t_biattention_id {self.t_biattention_id} "
                "must have the same length (one entry per co-attention layer)"
            )
        for name, ids, limit in (
            ("v_biattention_id", self.v_biattention_id, self.v_num_hidden_layers),
            ("t_biattention_id", self.t_biattention_id, self.num_hidden_layers),
        ):
            if any(b < a for a, b in zip(ids, ids[1:], strict=False)):
                problems.append(f"{name} {ids} must be non-decreasing")
            if ids and (min(ids) < 0 or max(ids) > limit):
                problems.append(f"{name} {ids} must lie in [0, {limit}]")
        for width, heads, what in (
            (self.hidden_size, self.num_attention_heads, "hidden_size/num_attention_heads"),
            (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size/v_num_attention_heads"),
            (self.bi_hidden_size, self.bi_num_attention_heads, "bi_hidden_size/bi_num_attention_heads"),
        ):
            if heads <= 0 or width % heads != 0:
                problems.append(f"{what} = {width}/{heads}: the width must be a multiple of the heads")
        if self.v_feature_norm not in FEATURE_NORMS:
            problems.append(f"v_feature_norm {self.v_feature_norm!r} must be one of {FEATURE_NORMS}")
        if self.num_gqa_answers < 0:
            problems.append(f"num_gqa_answers {self.num_gqa_answers} must be >= 0 (0: no GQA head)")
        if self.fusion_method not in ("mul", "sum"):
            problems.append(f"fusion_method {self.fusion_method!r} must be 'mul' or 'sum'")
        if self.attn_implementation not in ("sdpa", "eager"):
            problems.append(f"attn_implementation {self.attn_implementation!r} must be 'sdpa' or 'eager'")
        for name in ("hidden_act", "v_hidden_act"):
            if getattr(self, name) not in _ACTIVATIONS:
                problems.append(f"{name} {getattr(self, name)!r} must be one of {_ACTIVATIONS}")
        if len(set(self.task_tokens)) != len(self.task_tokens):
            problems.append(f"task_tokens {self.task_tokens} must name each task once")
        if problems:
            raise ValueError("invalid ViLBERTConfig: " + "; ".join(problems))

    @property
    def num_co_layers(self) -> int:
        """Number of co-attention layers."""
        return len(self.v_biattention_id)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ViLBERTConfig:
        """Return a named configuration: "vilbert-base" (the paper) or "tiny" (tests, demo)."""
        if name == "vilbert-base":
            values: dict[str, Any] = {}
        elif name == "tiny":
            values = {
                "vocab_size": 128,
                "hidden_size": 32,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
                "v_feature_size": 48,
                "v_target_size": 11,
                "v_hidden_size": 24,
                "v_num_hidden_layers": 2,
                "v_num_attention_heads": 2,
                "v_intermediate_size": 40,
                "bi_hidden_size": 16,
                "bi_num_attention_heads": 2,
                "v_biattention_id": [0, 1],
                "t_biattention_id": [2, 3],
                "num_answers": 7,
            }
        else:
            raise ValueError(f"unknown ViLBERTConfig preset {name!r}; choose 'vilbert-base' or 'tiny'")
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, reference_defaults: bool = False) -> ViLBERTConfig:
        """Build a config from a dict; unknown keys are ignored, missing ones defaulted."""
        names = {f.name for f in dataclasses.fields(cls)}
        merged: dict[str, Any] = dict(REFERENCE_DEFAULTS) if reference_defaults else {}
        # Keys such as pooling_method or bi_intermediate_size are ignored, as the reference ignores them.
        merged.update(values)
        return cls(**{k: v for k, v in merged.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> ViLBERTConfig:
        """Read the reference's JSON config or the project's own config.json."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object, got {type(values).__name__}")
        is_project = values.get("format") == PROJECT_FORMAT
        try:
            return cls.from_dict(values, reference_defaults=not is_project)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config file {path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict, tagged with the project format marker."""
        return {"format": PROJECT_FORMAT, **dataclasses.asdict(self)}

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON atomically (unique temporary file, fsync, rename)."""
        atomic_write_json(path, self.to_dict())
