"""ViLBERT (Lu et al., NeurIPS 2019): a text stream (BERT) and a visual stream joined by co-attention.

Read top to bottom: attention core, embeddings, transformer layers, the co-attention layer, the two-stream
backbone, heads, then the two public models (`ViLBERTForPretraining`, `ViLBERTForTasks`). Their
`save_pretrained` / `from_pretrained` and `init_text_from_bert` are in `checkpoint.py` (file formats,
reference key conversion, safetensors).

Shapes: B batch, T text tokens, R regions (region 0 is the global [IMG] region), D region feature size,
H heads. Masks given to the model are 1 for real tokens/regions and 0 for padding; internally they become
additive biases in the attention's dtype so that padded keys get exactly zero weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import ViLBERTConfig

_ACT2FN = {
    "gelu": nn.GELU(),  # exact erf GELU, as the reference and BERT use
    "gelu_new": nn.GELU(approximate="tanh"),
    "relu": nn.ReLU(),
    "swish": nn.SiLU(),
}


# ----------------------------------------------------------------------------- attention core
def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    *,
    dropout_p: float = 0.0,
    implementation: str = "sdpa",
    need_probs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention softmax(q k^T / sqrt(d) + mask) v; returns (context, probs or None).

    mask broadcasts to (B,H,Tq,Tk): boolean (True = may attend), an additive float bias, or None (no
    padding, which lets SDPA pick its fastest kernel).
    """
    # query (B,H,Tq,d), key/value (B,H,Tk,d) -> context (B,H,Tq,d)
    if mask is None:
        bias = None
    elif mask.dtype == torch.bool:
        # Built in the query's dtype (bf16 under autocast) with that dtype's finite minimum: masked keys
        # get weight exp(-huge) = 0 exactly, and an all-masked row stays finite instead of NaN.
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(~mask, torch.finfo(query.dtype).min)
    else:
        bias = mask.to(query.dtype)
    # On the CPU, PyTorch's bf16 SDPA kernel is 3-4x slower than the plain matmul path at ViLBERT's
    # sequence lengths (bench/bench_model.py --attention-only), so bf16 autocast on the CPU takes the latter.
    cpu_bf16 = query.device.type == "cpu" and query.dtype == torch.bfloat16
    if implementation == "sdpa" and not need_probs and not cpu_bf16:
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout_p)
        return context, None
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    context = torch.matmul(F.dropout(probs, p=dropout_p), value)
    return context, probs


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B,S,H*d) -> (B,H,S,d)."""
    b, s, w = x.shape
    return x.view(b, s, heads, w // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B,H,S,d) -> (B,S,H*d)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _keep_mask(mask: Tensor | None) -> Tensor | None:
    """(B,S) 1/0 mask of any dtype -> (B,1,1,S) bool, broadcast over heads and queries; None stays None."""
    return None if mask is None else (mask != 0)[:, None, None, :]


# ----------------------------------------------------------------------------- embeddings
class ViLBERTTextEmbeddings(nn.Module):
    """BERT embeddings: word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # multi-task models: one learned embedding per task, added at [CLS] for the active task (set_task)
        self.task_embeddings = nn.Embedding(len(config.task_tokens), config.hidden_size) if config.task_tokens else None
        self.active_task: int | None = None

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(B,T) ids -> (B,T,hidden)."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)[None, :]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        if self.task_embeddings is not None and self.active_task is not None:
            # (hidden,) at position 0 only: every sequence length, mask and cached scoring path stays as it is
            x = torch.cat([x[:, :1] + self.task_embeddings.weight[self.active_task], x[:, 1:]], dim=1)
        return self.dropout(self.layer_norm(x))


class ViLBERTImageEmbeddings(nn.Module):
    """Region embeddings: Linear(feature) + Linear(5-d box), summed, LayerNorm, dropout.

    With v_feature_norm="standardize" the features are first standardised per dimension with the
    training set's statistics (buffers saved with the weights, so every user of the model gets them).
    Detector features share a component much larger than what tells images apart; raw, small models
    learn to ignore the image (docs/training.md). "none" is the reference's raw input.
    """

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.location_proj = nn.Linear(5, config.v_hidden_size)
        self.layer_norm = nn.LayerNorm(config.v_hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.v_hidden_dropout_prob)
        self.standardize = config.v_feature_norm == "standardize"
        if self.standardize:
            # identity until set_feature_stats(); (D,) each
            self.register_buffer("feature_mean", torch.zeros(config.v_feature_size))
            self.register_buffer("feature_std", torch.ones(config.v_feature_size))

    def forward(self, image_feat: Tensor, image_loc: Tensor) -> Tensor:
        """(B,R,D) features and (B,R,5) boxes -> (B,R,v_hidden)."""
        if self.standardize:
            image_feat = ((image_feat - self.feature_mean) / self.feature_std).to(image_feat.dtype)
        x = self.feature_proj(image_feat) + self.location_proj(image_loc)
        return self.dropout(self.layer_norm(x))


# ----------------------------------------------------------------------------- transformer layers
@dataclass(frozen=True)
class _StreamDims:
    """Widths and dropouts of one stream, so text and visual layers share one implementation."""

    width: int
    heads: int
    intermediate: int
    act: str
    hidden_dropout: float
    attn_dropout: float

    @classmethod
    def of(cls, config: ViLBERTConfig, visual: bool) -> _StreamDims:
        """Dimensions of the visual stream (visual=True) or the text stream."""
        if visual:
            return cls(
                config.v_hidden_size,
                config.v_num_attention_heads,
                config.v_intermediate_size,
                config.v_hidden_act,
                config.v_hidden_dropout_prob,
                config.v_attention_probs_dropout_prob,
            )
        return cls(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.hidden_act,
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob,
        )


class ViLBERTSelfAttention(nn.Module):
    """Self-attention block of one stream: attention, output projection, residual, LayerNorm."""

    def __init__(self, config: ViLBERTConfig, dims: _StreamDims) -> None:
        super().__init__()
        self.config = config  # shared, so that attn_implementation can be switched on a built model
        self.heads = dims.heads
        self.attn_dropout = dims.attn_dropout
        self.query = nn.Linear(dims.width, dims.width)
        self.key = nn.Linear(dims.width, dims.width)
        self.value = nn.Linear(dims.width, dims.width)
        self.output = nn.Linear(dims.width, dims.width)
        self.layer_norm = nn.LayerNorm(dims.width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dims.hidden_dropout)

    def forward(self, hidden: Tensor, keep: Tensor | None, first_only: bool = False) -> Tensor:
        """(B,S,W) states, (B,1,1,S) bool keep mask -> (B,S,W), or (B,1,W) for the first position only."""
        # first_only: position 0 ([CLS] / [IMG]) queries every position; the others' outputs are not needed
        queries = hidden[:, :1] if first_only else hidden
        q = _split_heads(self.query(queries), self.heads)
        k = _split_heads(self.key(hidden), self.heads)
        v = _split_heads(self.value(hidden), self.heads)
        context, _ = attend(
            q,
            k,
            v,
            keep,
            dropout_p=self.attn_dropout if self.training else 0.0,
            implementation=self.config.attn_implementation,
        )
        return self.layer_norm(queries + self.dropout(self.output(_merge_heads(context))))


class ViLBERTFeedForward(nn.Module):
    """Feed-forward block: Linear, activation, Linear, dropout, residual, LayerNorm."""

    def __init__(self, config: ViLBERTConfig, dims: _StreamDims) -> None:
        super().__init__()
        self.intermediate = nn.Linear(dims.width, dims.intermediate)
        self.act = _ACT2FN[dims.act]
        self.output = nn.Linear(dims.intermediate, dims.width)
        self.layer_norm = nn.LayerNorm(dims.width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dims.hidden_dropout)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B,S,W) -> (B,S,W)."""
        return self.layer_norm(hidden + self.dropout(self.output(self.act(self.intermediate(hidden)))))


class ViLBERTLayer(nn.Module):
    """One transformer layer of a single stream (a BERT layer, in the stream's own width)."""

    def __init__(self, config: ViLBERTConfig, visual: bool) -> None:
        super().__init__()
        dims = _StreamDims.of(config, visual)
        self.attention = ViLBERTSelfAttention(config, dims)
        self.ffn = ViLBERTFeedForward(config, dims)

    def forward(self, hidden: Tensor, keep: Tensor | None, first_only: bool = False) -> Tensor:
        """(B,S,W) -> (B,S,W), or (B,1,W) for the first position only."""
        return self.ffn(self.attention(hidden, keep, first_only))


# ----------------------------------------------------------------------------- co-attention
class ViLBERTCoAttention(nn.Module):
    """Co-attention: text queries attend over regions, region queries over text, in bi_hidden width."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.config = config
        bi, v, t = config.bi_hidden_size, config.v_hidden_size, config.hidden_size
        self.heads = config.bi_num_attention_heads
        # as in the reference: text queries over regions drop attention weights at the visual stream's
        # rate, region queries over text at the text stream's
        self.t2i_dropout = config.v_attention_probs_dropout_prob
        self.i2t_dropout = config.attention_probs_dropout_prob
        # projections of the visual stream (reference: query1/key1/value1)
        self.v_query = nn.Linear(v, bi)
        self.v_key = nn.Linear(v, bi)
        self.v_value = nn.Linear(v, bi)
        # projections of the text stream (reference: query2/key2/value2)
        self.t_query = nn.Linear(t, bi)
        self.t_key = nn.Linear(t, bi)
        self.t_value = nn.Linear(t, bi)
        # back to each stream's native width, residual, LayerNorm
        self.v_output = nn.Linear(bi, v)
        self.v_layer_norm = nn.LayerNorm(v, eps=config.layer_norm_eps)
        self.v_dropout = nn.Dropout(config.v_hidden_dropout_prob)
        self.t_output = nn.Linear(bi, t)
        self.t_layer_norm = nn.LayerNorm(t, eps=config.layer_norm_eps)
        self.t_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        image: Tensor,
        image_keep: Tensor | None,
        text: Tensor,
        text_keep: Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """(B,R,v_hidden), (B,T,hidden) -> same shapes, plus (text->image, image->text) probs if asked."""
        h = self.heads
        t2i_p, i2t_p = (self.t2i_dropout, self.i2t_dropout) if self.training else (0.0, 0.0)
        impl = self.config.attn_implementation
        v_q, v_k, v_v = (
            _split_heads(f(image), h) for f in (self.v_query, self.v_key, self.v_value)
        )  # (B,H,R,d)
        t_q, t_k, t_v = (
            _split_heads(f(text), h) for f in (self.t_query, self.t_key, self.t_value)
        )  # (B,H,T,d)
        # text queries over regions (padded regions masked) -> (B,H,T,d); probs (B,H,T,R)
        t_ctx, t2i = attend(
            t_q, v_k, v_v, image_keep, dropout_p=t2i_p, implementation=impl, need_probs=output_attentions
        )
        # region queries over text (padded tokens masked) -> (B,H,R,d); probs (B,H,R,T)
        v_ctx, i2t = attend(
            v_q, t_k, t_v, text_keep, dropout_p=i2t_p, implementation=impl, need_probs=output_attentions
        )
        image = self.v_layer_norm(image + self.v_dropout(self.v_output(_merge_heads(v_ctx))))
        text = self.t_layer_norm(text + self.t_dropout(self.t_output(_merge_heads(t_ctx))))
        probs = (t2i, i2t) if output_attentions else None
        return image, text, probs


class ViLBERTCoLayer(nn.Module):
    """One co-TRM: co-attention, then each stream's own feed-forward block."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.co_attention = ViLBERTCoAttention(config)
        self.v_ffn = ViLBERTFeedForward(config, _StreamDims.of(config, visual=True))
        self.t_ffn = ViLBERTFeedForward(config, _StreamDims.of(config, visual=False))

    def forward(
        self,
        image: Tensor,
        image_keep: Tensor | None,
        text: Tensor,
        text_keep: Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """(B,R,v_hidden), (B,T,hidden) -> same shapes, plus co-attention probs if asked."""
        image, text, probs = self.co_attention(image, image_keep, text, text_keep, output_attentions)
        return self.v_ffn(image), self.t_ffn(text), probs


class ViLBERTPooler(nn.Module):
    """Linear + ReLU on the first position ([CLS] token or [IMG] region)."""

    def __init__(self, in_width: int, out_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, out_width)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B,S,W) -> (B,out_width)."""
        return F.relu(self.dense(hidden[:, 0]))


# ----------------------------------------------------------------------------- outputs
@dataclass(kw_only=True)
class ViLBERTModelOutput:
    """Final states of both streams and the fused pooled vector."""

    text_hidden: Tensor  # (B,T,hidden)
    visual_hidden: Tensor  # (B,R,v_hidden)
    pooled: Tensor  # (B,bi_hidden) fused text pooled * visual pooled (or sum)
    text_pooled: Tensor  # (B,bi_hidden)
    visual_pooled: Tensor  # (B,bi_hidden)
    # one (text->image (B,H,T,R), image->text (B,H,R,T)) pair per co-attention layer, if asked
    co_attentions: list[tuple[Tensor, Tensor]] | None = None


@dataclass(kw_only=True)
class ViLBERTPretrainingOutput(ViLBERTModelOutput):
    """Backbone outputs plus the pretraining heads' logits."""

    mlm_logits: Tensor  # (B,T,vocab), or (N,vocab) for the N tokens of mlm_positions
    mrm_logits: Tensor  # (B,R,v_target_size), or (N,v_target_size) for the regions of mrm_positions
    align_logit: Tensor  # (B,) log-odds that text and image match


@dataclass(kw_only=True)
class ViLBERTTaskOutput(ViLBERTModelOutput):
    """Backbone outputs plus the task heads' logits."""

    vqa_logits: Tensor  # (B,num_answers)
    pair_logit: Tensor  # (B,) one score per image-text pair (VCR, retrieval)
    region_logits: Tensor  # (B,R) referring expressions; padded regions get -10000
    tri_logits: Tensor | None = None  # (B,3) three-way classes (SNLI-VE, GuessWhat?! answers)
    token_logits: Tensor | None = None  # (B,T) one score per token (the reference's linguisic_logit); padding -10000
    gqa_logits: Tensor | None = None  # (B,num_gqa_answers) when the model has a GQA head


# ----------------------------------------------------------------------------- backbone
def _check_inputs(
    config: ViLBERTConfig,
    input_ids: Tensor,
    image_feat: Tensor,
    image_loc: Tensor,
    token_type_ids: Tensor | None,
    attention_mask: Tensor | None,
    image_mask: Tensor | None,
) -> None:
    """Raise ValueError naming the input whose shape is wrong."""
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}; "
            "flatten a candidate dimension (B,C,T) to (B*C,T) before calling the model"
        )
    b, t = input_ids.shape
    if t > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {t} tokens, more than max_position_embeddings={config.max_position_embeddings}"
        )
    if image_feat.dim() != 3 or image_feat.size(0) != b or image_feat.size(-1) != config.v_feature_size:
        raise ValueError(
            f"image_feat must be (batch={b}, regions, v_feature_size={config.v_feature_size}), "
            f"got shape {tuple(image_feat.shape)}"
        )
    r = image_feat.size(1)
    expected = {
        "image_loc": (image_loc, (b, r, 5)),
        "token_type_ids": (token_type_ids, (b, t)),
        "attention_mask": (attention_mask, (b, t)),
        "image_mask": (image_mask, (b, r)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


class ViLBERTModel(nn.Module):
    """Two-stream backbone: embeddings, text/visual layers interleaved with co-attention, poolers.

    forward() runs three stages that scoring many (text, image) pairs can also call apart:
    `embed_text` (text embeddings and the text layers before the first co-attention layer: they see
    only the text), `embed_image` (region embeddings and the visual layers before the first
    co-attention layer: only the image), and `fuse` (everything from the first co-attention layer on).
    """

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ViLBERTTextEmbeddings(config)
        self.image_embeddings = ViLBERTImageEmbeddings(config)
        self.text_layers = nn.ModuleList(
            ViLBERTLayer(config, visual=False) for _ in range(config.num_hidden_layers)
        )
        self.visual_layers = nn.ModuleList(
            ViLBERTLayer(config, visual=True) for _ in range(config.v_num_hidden_layers)
        )
        self.co_layers = nn.ModuleList(ViLBERTCoLayer(config) for _ in range(config.num_co_layers))
        self.text_pooler = ViLBERTPooler(config.hidden_size, config.bi_hidden_size)
        self.visual_pooler = ViLBERTPooler(config.v_hidden_size, config.bi_hidden_size)
        # recompute each layer's activations in the backward pass instead of keeping them (less memory
        # for long sequences, about a third more compute); set by ViLBERTPreTrainedModel.gradient_checkpointing_enable
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        image_feat: Tensor,
        image_loc: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> ViLBERTModelOutput:
        """Run both streams; masks are 1 for real tokens/regions (default: all real)."""
        _check_inputs(
            self.config, input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_mask
        )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # both embeddings, then each stream's layers before co-attention: the order of the layer schedule,
        # which fixes the order of dropout draws
        text = self.embeddings(input_ids, token_type_ids)  # (B,T,hidden)
        image = self._embed_regions(image_feat, image_loc)  # (B,R,v_hidden)
        text = self._layers_before_co_attention(text, attention_mask, visual=False)
        image = self._layers_before_co_attention(image, image_mask, visual=True)
        return self.fuse(text, image, attention_mask, image_mask, output_attentions)

    def embed_text(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """(B,T) ids -> (B,T,hidden): text embeddings and the text layers before the first co-attention layer."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self._layers_before_co_attention(self.embeddings(input_ids, token_type_ids), attention_mask, visual=False)

    def embed_image(self, image_feat: Tensor, image_loc: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """(B,R,D) features, (B,R,5) boxes -> (B,R,v_hidden): region embeddings and the visual layers before co-attention."""
        return self._layers_before_co_attention(self._embed_regions(image_feat, image_loc), image_mask, visual=True)

    def _embed_regions(self, image_feat: Tensor, image_loc: Tensor) -> Tensor:
        """Region embeddings in the text stream's dtype (a bf16 model takes bf16 regions)."""
        dtype = self.embeddings.word_embeddings.weight.dtype
        return self.image_embeddings(image_feat.to(dtype), image_loc.to(dtype))

    def _layers_before_co_attention(self, hidden: Tensor, mask: Tensor | None, visual: bool) -> Tensor:
        """Run one stream's layers that come before the first co-attention layer (they see that stream only)."""
        n_text, n_visual = self._first_co_layer_inputs()
        layers = self.visual_layers[:n_visual] if visual else self.text_layers[:n_text]
        keep = _keep_mask(mask)  # an omitted mask means no padding: attention then runs without a bias
        for layer in layers:
            hidden = self._run(layer, hidden, keep)
        return hidden

    def _first_co_layer_inputs(self) -> tuple[int, int]:
        """How many text and visual layers run before the first co-attention layer (all, without one)."""
        if not self.config.t_biattention_id:
            return self.config.num_hidden_layers, self.config.v_num_hidden_layers
        return self.config.t_biattention_id[0], self.config.v_biattention_id[0]

    def _run(self, layer: nn.Module, *args: Any) -> Any:
        """Call a layer, through activation checkpointing when it is on and gradients are being taken."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # non-reentrant checkpointing restores the RNG state, so dropout masks match the first pass
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def fuse(
        self,
        text: Tensor,
        image: Tensor,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        output_attentions: bool = False,
        pooled_only: bool = False,
    ) -> ViLBERTModelOutput:
        """embed_text's (B,T,hidden) and embed_image's (B,R,v_hidden) -> final states and pooled vectors.

        pooled_only: each stream's last layer after the last co-attention layer computes only what the
        poolers read, the [CLS] token and the [IMG] region (text_hidden, visual_hidden are then (B,1,...)).
        """
        text_keep, image_keep = _keep_mask(attention_mask), _keep_mask(image_mask)
        co_attentions: list[tuple[Tensor, Tensor]] = []
        t_start, v_start = self._first_co_layer_inputs()
        # Co-attention layer k follows text layer t_biattention_id[k]-1 and visual layer v_biattention_id[k]-1.
        for k, (v_end, t_end) in enumerate(
            zip(self.config.v_biattention_id, self.config.t_biattention_id, strict=True)
        ):
            for layer in self.text_layers[t_start:t_end]:
                text = self._run(layer, text, text_keep)
            for layer in self.visual_layers[v_start:v_end]:
                image = self._run(layer, image, image_keep)
            if self.config.with_coattention:
                image, text, probs = self._run(
                    self.co_layers[k], image, image_keep, text, text_keep, output_attentions
                )
                if probs is not None:
                    co_attentions.append(probs)
            t_start, v_start = t_end, v_end
        last_v, last_t = len(self.visual_layers) - 1, len(self.text_layers) - 1
        for i, layer in enumerate(self.visual_layers[v_start:], v_start):
            image = self._run(layer, image, image_keep, pooled_only and i == last_v)
        for i, layer in enumerate(self.text_layers[t_start:], t_start):
            text = self._run(layer, text, text_keep, pooled_only and i == last_t)

        text_pooled = self.text_pooler(text)  # (B,bi_hidden) from [CLS]
        visual_pooled = self.visual_pooler(image)  # (B,bi_hidden) from [IMG]
        if self.config.fusion_method == "sum":
            pooled = text_pooled + visual_pooled
        else:
            pooled = text_pooled * visual_pooled
        return ViLBERTModelOutput(
            text_hidden=text,
            visual_hidden=image,
            pooled=pooled,
            text_pooled=text_pooled,
            visual_pooled=visual_pooled,
            co_attentions=co_attentions if output_attentions else None,
        )


# ----------------------------------------------------------------------------- heads
class ViLBERTPredictionTransform(nn.Module):
    """dense + activation + LayerNorm before a token or region classifier."""

    def __init__(self, width: int, act: str, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = _ACT2FN[act]
        self.layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B,S,W) -> (B,S,W)."""
        return self.layer_norm(self.act(self.dense(hidden)))


class ViLBERTPredictionHead(nn.Module):
    """Masked token or region prediction: transform, then a Linear decoder to the classes.

    The MLM head (text stream -> vocabulary) has its decoder weight tied to the word embeddings by the
    pretraining model (its bias stays its own); the MRM head (visual stream -> detector classes) does not.
    """

    def __init__(self, width: int, act: str, eps: float, num_classes: int) -> None:
        super().__init__()
        self.transform = ViLBERTPredictionTransform(width, act, eps)
        self.decoder = nn.Linear(width, num_classes)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B,S,width) -> (B,S,num_classes)."""
        return self.decoder(self.transform(hidden))


class ViLBERTClassifierHead(nn.Module):
    """The reference's SimpleClassifier: Linear(in -> 2 bi), GELU, LayerNorm, Linear(-> classes).

    The answer heads take one fused vector (in = bi); the two-image (NLVR2) head takes two, concatenated
    (in = 2 bi).
    """

    def __init__(self, config: ViLBERTConfig, num_classes: int, inputs: int = 1) -> None:
        super().__init__()
        width = 2 * config.bi_hidden_size
        self.dense = nn.Linear(inputs * config.bi_hidden_size, width)
        self.act = nn.GELU()
        self.layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B,inputs*bi_hidden) -> (B,num_classes)."""
        return self.classifier(self.layer_norm(self.act(self.dense(pooled))))


class ViLBERTVQAHead(ViLBERTClassifierHead):
    """VQA classifier: Linear(bi -> 2 bi), GELU, LayerNorm, Linear(-> num_answers)."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__(config, config.num_answers)


# ----------------------------------------------------------------------------- public models
class ViLBERTPreTrainedModel(nn.Module):
    """Shared weight init, attention switch, save_pretrained and from_pretrained."""

    # parameters of this class's own heads: they may start fresh when a checkpoint lacks them
    _head_prefixes: tuple[str, ...] = ()
    # our name -> name of the parameter it is tied to
    _tied_weights: dict[str, str] = {}

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.config = config
        self.vilbert = ViLBERTModel(config)

    def post_init(self) -> None:
        """Initialise every weight as the reference does, then tie shared weights."""
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for Linear/Embedding, zero biases, unit LayerNorm."""
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def tie_weights(self) -> None:
        """Make tied parameters the same Parameter object (none in the base class)."""

    def set_attn_implementation(self, implementation: str) -> None:
        """Switch every attention layer between "sdpa" and "eager" (plain matmul-softmax)."""
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {implementation!r}")
        self.config.attn_implementation = implementation

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute every layer's activations during backward instead of storing them (memory for compute)."""
        self.vilbert.gradient_checkpointing = enable

    def set_feature_stats(self, mean: Tensor | Any, std: Tensor | Any) -> None:
        """Set the per-dimension mean and std that a v_feature_norm="standardize" model standardises with."""
        emb = self.vilbert.image_embeddings
        if not emb.standardize:
            raise ValueError(
                f"this model's v_feature_norm is {self.config.v_feature_norm!r}: it takes raw features and has "
                "no statistics to set (build it with v_feature_norm='standardize')"
            )
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        d = self.config.v_feature_size
        if mean.numel() != d or std.numel() != d:
            raise ValueError(f"feature statistics of size {mean.numel()}/{std.numel()}, the model takes {d}-d features")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("feature statistics must be finite with a positive std")
        with torch.no_grad():
            emb.feature_mean.copy_(mean)
            emb.feature_std.copy_(std)

    def add_task_tokens(self, tasks: list[str]) -> None:
        """Give the tasks that have none a learned task embedding (new rows: Normal(0, initializer_range))."""
        embeddings = self.vilbert.embeddings
        new = [name for name in tasks if name not in self.config.task_tokens]
        if not new:
            return
        weight = torch.empty(len(self.config.task_tokens) + len(new), self.config.hidden_size,
                             device=embeddings.word_embeddings.weight.device)  # fmt: skip
        weight.normal_(mean=0.0, std=self.config.initializer_range)
        if embeddings.task_embeddings is not None:
            weight[: len(self.config.task_tokens)] = embeddings.task_embeddings.weight.detach()
        embeddings.task_embeddings = nn.Embedding.from_pretrained(weight, freeze=False)
        self.config.task_tokens = [*self.config.task_tokens, *new]

    def set_task(self, task: str | None) -> None:
        """Condition the text stream on `task`'s learned embedding (a model with task_tokens); None: no task token.

        A model without task tokens ignores the call; a task it has no token for is a ValueError.
        """
        embeddings = self.vilbert.embeddings
        if not self.config.task_tokens:
            return
        if task is not None and task not in self.config.task_tokens:
            raise ValueError(f"the model has task tokens for {', '.join(self.config.task_tokens)}, not {task!r}")
        embeddings.active_task = None if task is None else self.config.task_tokens.index(task)

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied ones counted once)."""
        return sum(p.numel() for p in self.parameters())

    # -------------------------------------------------------------- checkpoints (vilbert_core/checkpoint.py)
    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write config.json and model.safetensors (tied copies dropped) atomically into directory."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls,
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
        arguments override config fields. reference_answer_head: which answer head of a multi-task
        reference checkpoint becomes `vqa_head` (vil_prediction for VQA, vil_prediction_gqa for GQA).
        Returns the model in eval mode, or (model, LoadReport) when output_loading_info is true.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(
            cls, path, config, num_answers=num_answers, output_loading_info=output_loading_info,
            reference_answer_head=reference_answer_head, **config_overrides,
        )  # fmt: skip


class ViLBERTForPretraining(ViLBERTPreTrainedModel):
    """ViLBERT with the pretraining heads: masked language, masked region, and alignment."""

    _head_prefixes = ("mlm_head.", "mrm_head.", "align_head.")
    _tied_weights = {"mlm_head.decoder.weight": "vilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__(config)
        eps = config.layer_norm_eps
        self.mlm_head = ViLBERTPredictionHead(config.hidden_size, config.hidden_act, eps, config.vocab_size)
        self.mrm_head = ViLBERTPredictionHead(
            config.v_hidden_size, config.v_hidden_act, eps, config.v_target_size
        )
        self.align_head = nn.Linear(config.bi_hidden_size, 1)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.post_init()

    def tie_weights(self) -> None:
        """Share the MLM decoder weight with the word embeddings."""
        self.mlm_head.decoder.weight = self.vilbert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: Tensor,
        image_feat: Tensor,
        image_loc: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        output_attentions: bool = False,
        mlm_positions: Tensor | None = None,
        mrm_positions: Tensor | None = None,
    ) -> ViLBERTPretrainingOutput:
        """Backbone plus MLM (B,T,vocab), MRM (B,R,v_target) and alignment (B,) logits.

        mlm_positions (B,T) / mrm_positions (B,R), boolean: predict only those tokens / regions; the
        logits are then (N,vocab) / (N,v_target) for the N chosen positions in row-major order. Training
        scores only the masked ~15%, and the 30522-way decoder over every token would be a tenth of the step.
        """
        base = self.vilbert(
            input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_mask, output_attentions
        )
        text, regions = base.text_hidden, base.visual_hidden
        return ViLBERTPretrainingOutput(
            **_fields(base),
            mlm_logits=self.mlm_head(text if mlm_positions is None else text[mlm_positions.bool()]),
            mrm_logits=self.mrm_head(regions if mrm_positions is None else regions[mrm_positions.bool()]),
            align_logit=self.align_head(self.dropout(base.pooled)).squeeze(-1),
        )

    def score_pairs(
        self, text: Tensor, image: Tensor, attention_mask: Tensor | None = None, image_mask: Tensor | None = None
    ) -> Tensor:
        """Alignment logits (B,) from `vilbert.embed_text` and `vilbert.embed_image` outputs (zero-shot retrieval)."""
        base = self.vilbert.fuse(text, image, attention_mask, image_mask, pooled_only=True)
        return _ranking_head(self.align_head, self.dropout(base.pooled))


class ViLBERTForTasks(ViLBERTPreTrainedModel):
    """ViLBERT with the fine-tuning heads of the multi-task reference.

    vqa_head: answer classifier (VQA, GQA); pair_head: one score per pair (VCR, retrieval); region_head:
    one score per region (RefCOCO); binary_head: two classes from two images' fused vectors (NLVR2,
    `image_pair_logits`); tri_head: three classes (SNLI-VE, GuessWhat?!); token_head: one score per token
    (unused by any task here; kept so that a converted checkpoint loads whole); gqa_head (only with
    config.num_gqa_answers > 0): a second answer classifier holding the reference's GQA head.
    """

    _head_prefixes = ("vqa_head.", "pair_head.", "region_head.", "binary_head.", "tri_head.", "token_head.",
                      "gqa_head.")  # fmt: skip

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__(config)
        self.vqa_head = ViLBERTVQAHead(config)
        self.pair_head = nn.Linear(config.bi_hidden_size, 1)
        self.region_head = nn.Linear(config.v_hidden_size, 1)
        self.binary_head = ViLBERTClassifierHead(config, 2, inputs=2)
        self.tri_head = nn.Linear(config.bi_hidden_size, 3)
        self.token_head = nn.Linear(config.hidden_size, 1)
        self.gqa_head = ViLBERTClassifierHead(config, config.num_gqa_answers) if config.num_gqa_answers else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.post_init()

    @property
    def num_answers(self) -> int:
        """Size of the VQA answer vocabulary."""
        return self.config.num_answers

    def forward(
        self,
        input_ids: Tensor,
        image_feat: Tensor,
        image_loc: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> ViLBERTTaskOutput:
        """Backbone plus VQA (B,A), pair (B,), per-region (B,R), three-way (B,3), per-token (B,T) (and GQA) logits."""
        base = self.vilbert(
            input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_mask, output_attentions
        )
        pooled = self.dropout(base.pooled)
        region_logits = self.region_head(self.dropout(base.visual_hidden)).squeeze(-1)  # (B,R)
        if image_mask is not None:
            # padded regions can never be the answer; -10000 as in the reference keeps BCE finite
            region_logits = region_logits.masked_fill(image_mask == 0, -10000.0)
        token_logits = self.token_head(self.dropout(base.text_hidden)).squeeze(-1)  # (B,T)
        if attention_mask is not None:
            token_logits = token_logits.masked_fill(attention_mask == 0, -10000.0)
        return ViLBERTTaskOutput(
            **_fields(base),
            vqa_logits=self.vqa_head(pooled),
            pair_logit=self.pair_head(pooled).squeeze(-1),
            region_logits=region_logits,
            tri_logits=self.tri_head(pooled),
            token_logits=token_logits,
            gqa_logits=None if self.gqa_head is None else self.gqa_head(pooled),
        )

    def image_pair_logits(
        self,
        input_ids: Tensor,
        image_feat: Tensor,
        image_loc: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """(B,2) two-image logits (NLVR2): the text (B,T) with each of its two images (B,2,R,...).

        As the reference: the text runs once with each image, and the binary head reads the two fused
        vectors concatenated, first image's first.
        """
        b = input_ids.shape[0]
        twice = [None if x is None else x.repeat_interleave(2, dim=0) for x in (input_ids, token_type_ids, attention_mask)]
        images = [None if x is None else x.flatten(0, 1) for x in (image_feat, image_loc, image_mask)]
        base = self.vilbert(twice[0], images[0], images[1], twice[1], twice[2], images[2])
        return self.binary_head(self.dropout(base.pooled).reshape(b, -1))

    def score_pairs(
        self, text: Tensor, image: Tensor, attention_mask: Tensor | None = None, image_mask: Tensor | None = None
    ) -> Tensor:
        """Pair logits (B,) from `vilbert.embed_text` and `vilbert.embed_image` outputs (retrieval, VCR).

        Equal to forward()'s pair_logit; scoring C texts against one image, or one caption against
        many images, computes each side's part before co-attention once instead of once per pair.
        """
        base = self.vilbert.fuse(text, image, attention_mask, image_mask, pooled_only=True)
        return _ranking_head(self.pair_head, self.dropout(base.pooled))


def _ranking_head(head: nn.Linear, pooled: Tensor) -> Tensor:
    """(B,) scores of a one-output head in its weights' dtype, autocast off.

    Under bf16 autocast the head would round every score to 8 significant bits, and pairs that a
    ranking must order would tie; the head is one small matmul, so it runs at the weights' precision.
    """
    device = pooled.device.type
    off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext()
    with off:  # (the meta device, which FLOP counts use, has no autocast)
        return head(pooled.to(head.weight.dtype)).squeeze(-1)


def _fields(output: ViLBERTModelOutput) -> dict[str, Any]:
    """Shallow field dict of a backbone output (dataclasses.asdict would deep-copy the tensors)."""
    return {f.name: getattr(output, f.name) for f in dataclasses.fields(ViLBERTModelOutput)}
