"""Explicit name mapping from the reference ViLBERT checkpoints (and Hugging Face BERT) to this project's model.

The reference (vilbert-multi-task / vilbert_beta) names are listed in ../shared/reference/vilbert_keys_*.txt.
Every reference tensor either maps to exactly one of our parameters by a rule in `_RULES`, or is
skipped with a reason from `_SKIPS`. The two-way alignment head becomes one logit: softmax index 0
("aligned") of [z0, z1] equals sigmoid(z0 - z1), so w = W[0] - W[1], b = b[0] - b[1].
"""

from __future__ import annotations

import re

import torch
from torch import Tensor


def _layer_rules(ref_stream: str, our_stream: str) -> list[tuple[str, str]]:
    """Rules for one stream's transformer layers (reference BertLayer / BertImageLayer layout)."""
    p = rf"bert\.encoder\.{ref_stream}\.(\d+)\."
    q = rf"vilbert.{our_stream}.\1."
    return [
        (p + r"attention\.self\.(query|key|value)\.(weight|bias)", q + r"attention.\2.\3"),
        (p + r"attention\.output\.dense\.(weight|bias)", q + r"attention.output.\2"),
        (p + r"attention\.output\.LayerNorm\.(weight|bias)", q + r"attention.layer_norm.\2"),
        (p + r"intermediate\.dense\.(weight|bias)", q + r"ffn.intermediate.\2"),
        (p + r"output\.dense\.(weight|bias)", q + r"ffn.output.\2"),
        (p + r"output\.LayerNorm\.(weight|bias)", q + r"ffn.layer_norm.\2"),
    ]


_CO = r"bert\.encoder\.c_layer\.(\d+)\."
_CO_OURS = r"vilbert.co_layers.\1."

# (reference name regex, our name template); each regex is matched against the whole name.
_RULES: list[tuple[str, str]] = [
    # text embeddings (identical to BERT's)
    (
        r"bert\.embeddings\.(word|position|token_type)_embeddings\.weight",
        r"vilbert.embeddings.\1_embeddings.weight",
    ),
    (r"bert\.embeddings\.LayerNorm\.(weight|bias)", r"vilbert.embeddings.layer_norm.\1"),
    # region embeddings
    (r"bert\.v_embeddings\.image_embeddings\.(weight|bias)", r"vilbert.image_embeddings.feature_proj.\1"),
    (
        r"bert\.v_embeddings\.image_location_embeddings\.(weight|bias)",
        r"vilbert.image_embeddings.location_proj.\1",
    ),
    (r"bert\.v_embeddings\.LayerNorm\.(weight|bias)", r"vilbert.image_embeddings.layer_norm.\1"),
    *_layer_rules("layer", "text_layers"),
    *_layer_rules("v_layer", "visual_layers"),
    # co-attention: 1 = visual stream, 2 = text stream in the reference
    (_CO + r"biattention\.(query|key|value)1\.(weight|bias)", _CO_OURS + r"co_attention.v_\2.\3"),
    (_CO + r"biattention\.(query|key|value)2\.(weight|bias)", _CO_OURS + r"co_attention.t_\2.\3"),
    (_CO + r"biOutput\.dense1\.(weight|bias)", _CO_OURS + r"co_attention.v_output.\2"),
    (_CO + r"biOutput\.LayerNorm1\.(weight|bias)", _CO_OURS + r"co_attention.v_layer_norm.\2"),
    (_CO + r"biOutput\.dense2\.(weight|bias)", _CO_OURS + r"co_attention.t_output.\2"),
    (_CO + r"biOutput\.LayerNorm2\.(weight|bias)", _CO_OURS + r"co_attention.t_layer_norm.\2"),
    (_CO + r"(v|t)_intermediate\.dense\.(weight|bias)", _CO_OURS + r"\2_ffn.intermediate.\3"),
    (_CO + r"(v|t)_output\.dense\.(weight|bias)", _CO_OURS + r"\2_ffn.output.\3"),
    (_CO + r"(v|t)_output\.LayerNorm\.(weight|bias)", _CO_OURS + r"\2_ffn.layer_norm.\3"),
    # poolers
    (r"bert\.t_pooler\.dense\.(weight|bias)", r"vilbert.text_pooler.dense.\1"),
    (r"bert\.v_pooler\.dense\.(weight|bias)", r"vilbert.visual_pooler.dense.\1"),
    # pretraining heads
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm_head.transform.dense.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.transform.layer_norm.\1"),
    (r"cls\.predictions\.decoder\.weight", r"mlm_head.decoder.weight"),
    (r"cls\.predictions\.(?:decoder\.)?bias", r"mlm_head.decoder.bias"),
    (r"cls\.imagePredictions\.transform\.dense\.(weight|bias)", r"mrm_head.transform.dense.\1"),
    (r"cls\.imagePredictions\.transform\.LayerNorm\.(weight|bias)", r"mrm_head.transform.layer_norm.\1"),
    (r"cls\.imagePredictions\.decoder\.(weight|bias)", r"mrm_head.decoder.\1"),
    (r"cls\.bi_seq_relationship\.(weight|bias)", r"align_head.\1"),
    # multi-task heads kept by ViLBERTForTasks
    (r"vil_prediction\.logit_fc\.0\.(weight|bias)", r"vqa_head.dense.\1"),
    (r"vil_prediction\.logit_fc\.2\.(weight|bias)", r"vqa_head.layer_norm.\1"),
    (r"vil_prediction\.logit_fc\.3\.(weight|bias)", r"vqa_head.classifier.\1"),
    (r"vil_logit\.(weight|bias)", r"pair_head.\1"),
    (r"vision_logit\.(weight|bias)", r"region_head.\1"),
    (r"vil_prediction_gqa\.logit_fc\.0\.(weight|bias)", r"gqa_head.dense.\1"),
    (r"vil_prediction_gqa\.logit_fc\.2\.(weight|bias)", r"gqa_head.layer_norm.\1"),
    (r"vil_prediction_gqa\.logit_fc\.3\.(weight|bias)", r"gqa_head.classifier.\1"),
    (r"vil_binary_prediction\.logit_fc\.0\.(weight|bias)", r"binary_head.dense.\1"),
    (r"vil_binary_prediction\.logit_fc\.2\.(weight|bias)", r"binary_head.layer_norm.\1"),
    (r"vil_binary_prediction\.logit_fc\.3\.(weight|bias)", r"binary_head.classifier.\1"),
    (r"vil_tri_prediction\.(weight|bias)", r"tri_head.\1"),
    (r"linguisic_logit\.(weight|bias)", r"token_head.\1"),
]
_COMPILED = [(re.compile(pattern), template) for pattern, template in _RULES]

# (reference name regex, reason it is dropped)
_SKIPS: list[tuple[str, str]] = [
    (
        r"bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.(weight|bias)",
        "unused by the reference forward pass",
    ),
    (r"bert\.embeddings\.task_embeddings\.weight", "task-token embeddings of the multi-task model"),
    (r"bert\.embeddings\.position_ids", "buffer, recomputed by the model"),
]
_COMPILED_SKIPS = [(re.compile(pattern), reason) for pattern, reason in _SKIPS]

# tensors whose value changes shape on the way in
_ALIGN_KEYS = {"cls.bi_seq_relationship.weight", "cls.bi_seq_relationship.bias"}


def strip_wrapper_prefixes(name: str) -> str:
    """Drop leading `module.` (DataParallel / DistributedDataParallel) and `_orig_mod.` (torch.compile)."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def normalize_reference_name(name: str) -> str:
    """Strip wrapper prefixes (`module.`) and turn old LayerNorm gamma/beta into weight/bias."""
    name = strip_wrapper_prefixes(name)
    if name.endswith(".gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith(".beta"):
        name = name[: -len("beta")] + "bias"
    return name


def reference_to_project(name: str) -> tuple[str | None, str]:
    """Map one (normalized) reference name to (our name, "") or (None, reason it is skipped)."""
    for pattern, template in _COMPILED:
        match = pattern.fullmatch(name)
        if match:
            return match.expand(template), ""
    for pattern, reason in _COMPILED_SKIPS:
        if pattern.fullmatch(name):
            return None, reason
    return None, "no mapping rule for this name"


def is_project_state_dict(state: dict[str, Tensor]) -> bool:
    """True when the names are this project's own (save_pretrained, or a wrapped model's state dict)."""
    return any(strip_wrapper_prefixes(name).startswith("vilbert.") for name in state)


# The multi-task checkpoint's answer classifiers: one SimpleClassifier per question-answering task, of the
# same layout; the one a task reads becomes vqa_head (see `answer_head` below).
ANSWER_HEADS = ("vil_prediction", "vil_prediction_gqa")


def _answer_head_name(name: str, answer_head: str) -> tuple[str, str]:
    """(name to map, "") with `answer_head`'s tensors renamed to vil_prediction's; ("", reason) for another task's."""
    head, _, rest = name.partition(".")
    if answer_head == "vil_prediction" or head not in ANSWER_HEADS:
        return name, ""
    if head == answer_head:
        return f"vil_prediction.{rest}", ""
    return "", f"answer head of another task of the multi-task model (this model reads {answer_head})"


def convert_reference_state_dict(
    state: dict[str, Tensor], answer_head: str = "vil_prediction"
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str]]:
    """Rename a reference state dict; returns (tensors by our name, skipped name -> reason, our name -> source name).

    answer_head: which of the multi-task model's answer classifiers (ANSWER_HEADS) becomes vqa_head;
    the default, VQA's vil_prediction, leaves the others skipped as before.
    """
    if answer_head not in ANSWER_HEADS:
        raise ValueError(f"answer_head must be one of {', '.join(ANSWER_HEADS)}, got {answer_head!r}")
    converted: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    origin: dict[str, str] = {}
    for raw_name, tensor in state.items():
        name, reason = _answer_head_name(normalize_reference_name(raw_name), answer_head)
        if not name:
            skipped[raw_name] = reason
            continue
        ours, reason = reference_to_project(name)
        if ours is None:
            skipped[raw_name] = reason
            continue
        if name in _ALIGN_KEYS:
            if tensor.shape[0] != 2:
                raise ValueError(
                    f"{raw_name} has shape {tuple(tensor.shape)}; expected 2 rows (aligned, not aligned)"
                )
            tensor = (tensor[0] - tensor[1]).unsqueeze(0)  # (1,bi) weight or (1,) bias
        converted[ours] = tensor
        origin[ours] = raw_name
    return converted, skipped, origin


def reference_head_sizes(state: dict[str, Tensor], answer_head: str = "vil_prediction") -> dict[str, int]:
    """Config fields that a reference state dict's optional heads need: num_gqa_answers when its GQA head has a home.

    With answer_head vil_prediction_gqa that head becomes vqa_head instead, and the model needs no second one.
    """
    for raw_name, tensor in state.items():
        if answer_head != "vil_prediction_gqa" and normalize_reference_name(raw_name) == "vil_prediction_gqa.logit_fc.3.weight":
            return {"num_gqa_answers": int(tensor.shape[0])}
    return {}


# ----------------------------------------------------------------------------- back to reference names
_CAPTURE = re.compile(r"\((?!\?)([^()]*)\)")  # a capture group (the rules nest none)
_OPTIONAL = re.compile(r"\(\?:[^()]*\)\?")  # an optional non-capturing part: left out going back


def _inverted(pattern: str, template: str) -> tuple[re.Pattern[str], str]:
    """The reverse of one rule: (regex over our names, reference name template).

    The template's \\N become the pattern's groups; the pattern's groups become back-references to them.
    """
    groups = _CAPTURE.findall(pattern)
    order: list[int] = []  # pattern group numbers in the order the template uses them
    pieces = re.split(r"\\(\d)", template)  # literal, group number, literal, ...
    reverse = ""
    for i, piece in enumerate(pieces):
        if i % 2:
            order.append(int(piece))
            reverse += f"({groups[int(piece) - 1]})"
        else:
            reverse += re.escape(piece)
    count = iter(range(1, len(groups) + 1))
    # \g<N>: a group followed by a digit (biattention.query1) must not read as group 21
    back = _CAPTURE.sub(lambda _m: f"\\g<{order.index(next(count)) + 1}>", _OPTIONAL.sub("", pattern))
    return re.compile(reverse), back.replace("\\.", ".")


_REVERSED = [_inverted(pattern, template) for pattern, template in _RULES]


def project_to_reference(name: str, answer_head: str = "vil_prediction") -> str | None:
    """The reference name of one of our parameters (None for ours alone: feature statistics, ...).

    answer_head: the reference answer head that vqa_head was read from (and is written back to).
    """
    for pattern, template in _REVERSED:
        match = pattern.fullmatch(name)
        if match:
            ref = match.expand(template)
            if answer_head != "vil_prediction" and ref.startswith("vil_prediction."):
                ref = answer_head + ref[len("vil_prediction") :]
            return ref
    return None


def convert_project_state_dict(
    state: dict[str, Tensor], answer_head: str = "vil_prediction"
) -> tuple[dict[str, Tensor], list[str]]:
    """Our state dict under reference names; returns (tensors, our names with no reference name).

    The one-logit alignment head goes back as two logits [w, 0]: softmax index 0 is then sigmoid(w x + b),
    the same probability.
    """
    if answer_head not in ANSWER_HEADS:
        raise ValueError(f"answer_head must be one of {', '.join(ANSWER_HEADS)}, got {answer_head!r}")
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for name, tensor in state.items():
        ref = project_to_reference(strip_wrapper_prefixes(name), answer_head)
        if ref is None:
            unmapped.append(name)
            continue
        if ref in _ALIGN_KEYS:
            tensor = torch.cat([tensor, torch.zeros_like(tensor)])
        out[ref] = tensor
    return out, unmapped


def convert_bert_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a Hugging Face BERT state dict (BertModel or BertForPreTraining) to our text-stream names."""
    names = [normalize_reference_name(n) for n in state]
    # BertModel.save_pretrained writes names without the "bert." prefix
    bare = not any(n.startswith("bert.") for n in names)
    converted: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    for raw_name, name in zip(state, names, strict=True):
        if bare and name.startswith(("embeddings.", "encoder.", "pooler.")):
            name = "bert." + name
        keep = name.startswith(("bert.embeddings.", "bert.encoder.layer.", "cls.predictions."))
        ours, reason = (
            reference_to_project(name) if keep else (None, "not part of the text stream or MLM head")
        )
        if ours is None:
            skipped[raw_name] = reason
        else:
            converted[ours] = state[raw_name]
    return converted, skipped
