"""ViLBERT model behaviour: config files, layer order, co-attention maths, padding invariance, SDPA vs eager."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _inputs(cfg: ViLBERTConfig, b: int = 3, t: int = 7, r: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random batch with some padded tokens and regions (masks 1 = real)."""
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[0, t - 2 :] = 0
    image_mask = torch.ones(b, r, dtype=torch.long)
    image_mask[1, r - 2 :] = 0
    return {
        "input_ids": torch.randint(1, cfg.vocab_size, (b, t), generator=g),
        "token_type_ids": torch.randint(0, 2, (b, t), generator=g),
        "attention_mask": attention_mask,
        "image_feat": torch.randn(b, r, cfg.v_feature_size, generator=g),
        "image_loc": torch.rand(b, r, 5, generator=g),
        "image_mask": image_mask,
    }


def _tiny(**overrides: object) -> ViLBERTConfig:
    """Tiny config without dropout so train/eval and implementations compare exactly."""
    values = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    values.update({"v_hidden_dropout_prob": 0.0, "v_attention_probs_dropout_prob": 0.0})
    values.update(overrides)
    return ViLBERTConfig.preset("tiny", **values)


# ------------------------------------------------------------------ config
def test_reference_json_reads_as_paper_preset() -> None:
    """The reference's vilbert_base_config.json gives exactly the paper preset."""
    path = REFERENCE / "vilbert_base_config.json"
    if not path.is_file():
        pytest.skip("shared/reference is not available")
    cfg = ViLBERTConfig.from_json_file(path)
    assert cfg == ViLBERTConfig.preset("vilbert-base")
    assert (cfg.v_hidden_size, cfg.v_num_hidden_layers, cfg.v_intermediate_size) == (1024, 6, 1024)
    assert cfg.v_biattention_id == [0, 1, 2, 3, 4, 5] and cfg.t_biattention_id == [6, 7, 8, 9, 10, 11]
    assert cfg.fusion_method == "mul"


def test_reference_json_missing_keys_take_reference_defaults(tmp_path: Path) -> None:
    """Keys absent from a reference JSON get the reference code's defaults, not the paper's."""
    path = tmp_path / "bert_small.json"
    path.write_text(json.dumps({"vocab_size": 1000, "bi_attention_type": 1, "pooling_method": "mul"}))
    cfg = ViLBERTConfig.from_json_file(path)
    assert cfg.vocab_size == 1000
    assert (cfg.v_hidden_size, cfg.v_num_hidden_layers, cfg.v_num_attention_heads) == (768, 3, 12)
    assert (cfg.v_intermediate_size, cfg.bi_num_attention_heads) == (3072, 16)
    assert cfg.v_biattention_id == [0, 1] and cfg.t_biattention_id == [10, 11]


def test_project_config_round_trip(tmp_path: Path) -> None:
    """to_json_file / from_json_file keep every field, including ones the reference lacks."""
    cfg = ViLBERTConfig.preset("tiny", vocab_size=321, fusion_method="sum", attn_implementation="eager")
    cfg.to_json_file(tmp_path / "config.json")
    assert ViLBERTConfig.from_json_file(tmp_path / "config.json") == cfg


def test_bad_config_and_file_errors(tmp_path: Path) -> None:
    """Inconsistent configs and unreadable files raise errors naming the problem."""
    with pytest.raises(ValueError, match="same length"):
        ViLBERTConfig.preset("tiny", v_biattention_id=[0])
    with pytest.raises(ValueError, match="multiple of the heads"):
        ViLBERTConfig.preset("tiny", bi_hidden_size=15)
    with pytest.raises(ValueError, match="unknown ViLBERTConfig preset"):
        ViLBERTConfig.preset("vilbert-huge")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        ViLBERTConfig.from_json_file(tmp_path / "broken.json")


# ------------------------------------------------------------------ layer order
def _call_order(cfg: ViLBERTConfig) -> list[str]:
    """Names of text/visual/co layers in the order the forward pass runs them (on the meta device)."""
    with torch.device("meta"):
        model = ViLBERTForPretraining(cfg)
    order: list[str] = []
    backbone = model.vilbert
    for kind, layers in (
        ("text", backbone.text_layers),
        ("vis", backbone.visual_layers),
        ("co", backbone.co_layers),
    ):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, name=f"{kind}{i}": order.append(name))
    b, t, r = 1, 4, 3
    with torch.device("meta"):
        model(
            input_ids=torch.zeros(b, t, dtype=torch.long),
            image_feat=torch.zeros(b, r, cfg.v_feature_size),
            image_loc=torch.zeros(b, r, 5),
        )
    return order


def test_layer_order_of_the_paper_config() -> None:
    """text 0-5, co0, (text6, vis0), co1, ..., co5, vis5, text11 exactly as vilbert.md states."""
    expected = [f"text{i}" for i in range(6)] + ["co0"]
    for k in range(1, 6):
        expected += [f"text{5 + k}", f"vis{k - 1}", f"co{k}"]
    expected += ["vis5", "text11"]
    assert _call_order(ViLBERTConfig.preset("vilbert-base")) == expected


def test_layer_order_other_ids_and_no_coattention() -> None:
    """Another id layout; with_coattention=False runs the same streams without co layers."""
    cfg = ViLBERTConfig.preset("tiny", v_biattention_id=[1, 2], t_biattention_id=[1, 3])
    assert _call_order(cfg) == ["text0", "vis0", "co0", "text1", "text2", "vis1", "co1", "text3"]
    cfg = ViLBERTConfig.preset("tiny", with_coattention=False)
    assert _call_order(cfg) == ["text0", "text1", "text2", "vis0", "vis1", "text3"]


# ------------------------------------------------------------------ co-attention maths
def _plain_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head loop of softmax(q k^T / sqrt(d) - 10000 * (1 - keep)) v on (B,S,W) tensors."""
    d = q.size(-1) // heads
    context = torch.zeros_like(q)
    probs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d) - 10000.0 * (
            1 - keep[:, None, :].float()
        )
        p = scores.softmax(-1)
        context[..., sl] = p @ v[..., sl]
        probs.append(p)
    return context, torch.stack(probs, dim=1)


def test_coattention_layer_matches_plain_loop() -> None:
    """A co-attention layer equals a per-head loop written from vilbert.md, and returns its probabilities."""
    torch.manual_seed(0)
    cfg = _tiny()
    co = ViLBERTForPretraining(cfg).eval().vilbert.co_layers[0]
    b, t, r = 2, 6, 4
    text, image = torch.randn(b, t, cfg.hidden_size), torch.randn(b, r, cfg.v_hidden_size)
    text_keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    image_keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    a = co.co_attention
    heads = cfg.bi_num_attention_heads
    t_ctx, t2i = _plain_attention(a.t_query(text), a.v_key(image), a.v_value(image), image_keep, heads)
    v_ctx, i2t = _plain_attention(a.v_query(image), a.t_key(text), a.t_value(text), text_keep, heads)
    image_mid = torch.nn.functional.layer_norm(
        image + a.v_output(v_ctx), (cfg.v_hidden_size,), a.v_layer_norm.weight, a.v_layer_norm.bias, 1e-12
    )
    text_mid = torch.nn.functional.layer_norm(
        text + a.t_output(t_ctx), (cfg.hidden_size,), a.t_layer_norm.weight, a.t_layer_norm.bias, 1e-12
    )
    with torch.no_grad():
        for impl, need in (("sdpa", False), ("eager", False), ("sdpa", True)):
            cfg.attn_implementation = impl
            got_image, got_text, probs = co(
                image, image_keep[:, None, None, :] == 1, text, text_keep[:, None, None, :] == 1, need
            )
            torch.testing.assert_close(got_image, co.v_ffn(image_mid), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_text, co.t_ffn(text_mid), atol=1e-5, rtol=1e-5)
            if need:
                torch.testing.assert_close(probs[0], t2i, atol=1e-6, rtol=1e-5)  # (B,H,T,R)
                torch.testing.assert_close(probs[1], i2t, atol=1e-6, rtol=1e-5)  # (B,H,R,T)
                assert probs[0][1, :, :, 2:].abs().max() == 0  # padded regions get no weight


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_coattention_dropout_rates_follow_the_reference(impl: str) -> None:
    """Text->image attention drops at v_attention_probs_dropout_prob, image->text at attention_probs_dropout_prob."""
    torch.manual_seed(0)
    cfg = _tiny(v_attention_probs_dropout_prob=0.5, attn_implementation=impl)
    co = ViLBERTForPretraining(cfg).train().vilbert.co_layers[0].co_attention
    text, image = torch.randn(2, 6, cfg.hidden_size), torch.randn(2, 4, cfg.v_hidden_size)
    with torch.no_grad():
        first, second = co(image, None, text, None), co(image, None, text, None)
    assert torch.equal(first[0], second[0])  # regions attend over text: no dropout
    assert not torch.allclose(first[1], second[1])  # text attends over regions: dropout 0.5


# ------------------------------------------------------------------ padding and implementations
def _all_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor output of a forward pass, by name."""
    with torch.no_grad():
        out = model(**inputs)
    return {k: v for k, v in vars(out).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_cls", [ViLBERTForPretraining, ViLBERTForTasks])
def test_padding_invariance(impl: str, model_cls: type) -> None:
    """Appending padded tokens and regions (garbage values) leaves every real output unchanged."""
    torch.manual_seed(0)
    cfg = _tiny(attn_implementation=impl)
    model = model_cls(cfg).eval()
    small = _inputs(cfg, t=7, r=5)
    big = {k: v.clone() for k, v in small.items()}
    extra_t, extra_r = 4, 3
    g = torch.Generator().manual_seed(1)
    big["input_ids"] = torch.cat(
        [small["input_ids"], torch.randint(1, cfg.vocab_size, (3, extra_t), generator=g)], 1
    )
    big["token_type_ids"] = torch.cat([small["token_type_ids"], torch.ones(3, extra_t, dtype=torch.long)], 1)
    big["attention_mask"] = torch.cat([small["attention_mask"], torch.zeros(3, extra_t, dtype=torch.long)], 1)
    big["image_feat"] = torch.cat(
        [small["image_feat"], 100 * torch.randn(3, extra_r, cfg.v_feature_size, generator=g)], 1
    )
    big["image_loc"] = torch.cat([small["image_loc"], torch.rand(3, extra_r, 5, generator=g)], 1)
    big["image_mask"] = torch.cat([small["image_mask"], torch.zeros(3, extra_r, dtype=torch.long)], 1)
    a, b = _all_outputs(model, small), _all_outputs(model, big)
    for name, value in a.items():
        other = b[name]
        if name in ("text_hidden", "mlm_logits", "token_logits"):
            other = other[:, :7]
        elif name in ("visual_hidden", "mrm_logits", "region_logits"):
            other = other[:, :5]
        torch.testing.assert_close(other, value, atol=2e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if "region_logits" in a:  # padded regions score -10000 whatever their features
        assert torch.all(b["region_logits"][1, 3:] == -10000.0)


def test_sdpa_equals_eager_forward_and_gradients() -> None:
    """The SDPA path and the plain matmul-softmax path agree on outputs and on gradients."""
    torch.manual_seed(0)
    cfg = _tiny()
    model = ViLBERTForPretraining(cfg).train()  # dropout is 0, so train mode is deterministic
    inputs = _inputs(cfg)
    results = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = model(**inputs)
        loss = out.mlm_logits.square().mean() + out.mrm_logits.square().mean() + out.align_logit.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.mlm_logits.detach(), out.mrm_logits.detach(), out.align_logit.detach(), grads)
    for x, y in zip(results["sdpa"][:3], results["eager"][:3], strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    gs, ge = results["sdpa"][3], results["eager"][3]
    assert gs.keys() == ge.keys() and len(gs) == len(list(model.parameters()))
    for name in gs:
        torch.testing.assert_close(
            gs[name], ge[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_activation_checkpointing_gives_the_same_outputs_and_gradients() -> None:
    """Recomputing activations in backward changes nothing: same losses and gradients, dropout included."""
    cfg = ViLBERTConfig.preset("tiny", v_num_hidden_layers=3, v_biattention_id=[1, 2])  # dropout 0.1 on
    torch.manual_seed(0)
    model = ViLBERTForPretraining(cfg).train()
    inputs = _inputs(cfg)

    def loss_of(out: object) -> torch.Tensor:
        return out.mlm_logits.square().mean() + out.mrm_logits.square().mean() + out.align_logit.sum()

    results = []
    for on in (False, True):
        model.gradient_checkpointing_enable(on)
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both passes
        loss = loss_of(model(**inputs))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        assert abs(float(loss_of(model.eval()(**inputs)) - loss_a)) > 1e-4  # dropout really was on


def test_prediction_positions_are_the_full_heads_rows() -> None:
    """mlm_positions / mrm_positions give exactly the chosen rows of the full MLM / MRM logits."""
    torch.manual_seed(0)
    cfg = _tiny()
    model = ViLBERTForPretraining(cfg).eval()
    inputs = _inputs(cfg)
    tokens = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) < 0.3
    regions = torch.zeros(3, 5, dtype=torch.bool)
    regions[2, 1:3] = True
    full = model(**inputs)
    part = model(**inputs, mlm_positions=tokens, mrm_positions=regions)
    assert part.mlm_logits.shape == (int(tokens.sum()), cfg.vocab_size) and part.mrm_logits.shape == (2, 11)
    torch.testing.assert_close(part.mlm_logits, full.mlm_logits[tokens], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(part.mrm_logits, full.mrm_logits[2, 1:3], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(part.align_logit, full.align_logit, atol=0, rtol=0)
    none = model(**inputs, mlm_positions=torch.zeros_like(tokens), mrm_positions=torch.zeros_like(regions))
    assert none.mlm_logits.shape == (0, cfg.vocab_size) and none.mrm_logits.shape == (0, 11)


def test_output_attentions_shapes_and_probabilities() -> None:
    """co_attentions holds (B,H,T,R) and (B,H,R,T) rows summing to one, zero on padding; outputs unchanged."""
    torch.manual_seed(0)
    cfg = _tiny()
    model = ViLBERTForTasks(cfg).eval()
    inputs = _inputs(cfg)
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_attentions=True)
    assert plain.co_attentions is None
    assert len(out.co_attentions) == cfg.num_co_layers
    for t2i, i2t in out.co_attentions:
        assert t2i.shape == (3, cfg.bi_num_attention_heads, 7, 5)
        assert i2t.shape == (3, cfg.bi_num_attention_heads, 5, 7)
        torch.testing.assert_close(t2i.sum(-1), torch.ones(3, cfg.bi_num_attention_heads, 7))
        torch.testing.assert_close(i2t.sum(-1), torch.ones(3, cfg.bi_num_attention_heads, 5))
        assert t2i[1, :, :, 3:].abs().max() == 0 and i2t[0, :, :, 5:].abs().max() == 0
    torch.testing.assert_close(out.vqa_logits, plain.vqa_logits)


def test_heads_fusion_and_region_mask() -> None:
    """pooled is text_pooled * visual_pooled (or the sum); the heads read the documented inputs."""
    torch.manual_seed(0)
    inputs = _inputs(_tiny())
    for fusion in ("mul", "sum"):
        cfg = _tiny(fusion_method=fusion)
        model = ViLBERTForTasks(cfg).eval()
        with torch.no_grad():
            out = model(**inputs)
        expected = (
            out.text_pooled * out.visual_pooled if fusion == "mul" else out.text_pooled + out.visual_pooled
        )
        torch.testing.assert_close(out.pooled, expected)
        assert torch.all(out.text_pooled >= 0) and torch.all(out.visual_pooled >= 0)  # ReLU poolers
        assert out.vqa_logits.shape == (3, cfg.num_answers) and out.pair_logit.shape == (3,)
        torch.testing.assert_close(out.pair_logit, model.pair_head(out.pooled).squeeze(-1))
        assert torch.all(out.region_logits[1, 3:] == -10000.0) and torch.all(out.region_logits[0] > -100)
    model = ViLBERTForPretraining(_tiny()).eval()
    with torch.no_grad():
        out = model(**inputs)
    assert (
        out.mlm_logits.shape == (3, 7, 128)
        and out.mrm_logits.shape == (3, 5, 11)
        and out.align_logit.shape == (3,)
    )
    assert model.mlm_head.decoder.weight is model.vilbert.embeddings.word_embeddings.weight


def test_bad_inputs_name_the_input() -> None:
    """Wrong shapes raise a ValueError that names the offending input."""
    cfg = _tiny()
    model = ViLBERTForTasks(cfg).eval()
    inputs = _inputs(cfg)
    with pytest.raises(ValueError, match="flatten"):
        model(**{**inputs, "input_ids": inputs["input_ids"][:, None]})
    with pytest.raises(ValueError, match="image_feat"):
        model(**{**inputs, "image_feat": inputs["image_feat"][..., :-1]})
    with pytest.raises(ValueError, match="image_mask"):
        model(**{**inputs, "image_mask": inputs["image_mask"][:, :-1]})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(
            input_ids=torch.ones(1, 65, dtype=torch.long),
            image_feat=inputs["image_feat"][:1],
            image_loc=inputs["image_loc"][:1],
        )


def test_attend_boolean_and_additive_masks_agree() -> None:
    """attend() takes a boolean or an additive mask; both match a plain softmax, an all-masked row stays finite."""
    from vilbert_core.modeling import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))
    keep = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)[:, None, None, :]  # sample 1: no keys
    additive = torch.where(keep, 0.0, -1e9)
    expected = (q @ k.transpose(-1, -2) / math.sqrt(8) + additive).softmax(-1) @ v
    for impl in ("sdpa", "eager"):
        for mask in (keep, additive):
            context, _ = attend(q, k, v, mask, implementation=impl)
            torch.testing.assert_close(context[0], expected[0], atol=1e-5, rtol=1e-5)
            assert torch.isfinite(context).all()
    unmasked = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(
            attend(q, k, v, None, implementation=impl)[0], unmasked, atol=1e-5, rtol=1e-5
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context, probs = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep, need_probs=True)
    assert torch.isfinite(context).all() and probs[0, :, :, 2].abs().max() == 0


def test_omitted_masks_equal_all_real_masks() -> None:
    """Leaving out the masks (no bias at all) gives the same outputs as all-ones masks."""
    torch.manual_seed(0)
    cfg = _tiny()
    model = ViLBERTForTasks(cfg).eval()
    inputs = _inputs(cfg)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    inputs["image_mask"] = torch.ones_like(inputs["image_mask"])
    full = _all_outputs(model, inputs)
    bare = _all_outputs(model, {k: v for k, v in inputs.items() if not k.endswith("mask")})
    for name, value in full.items():
        torch.testing.assert_close(bare[name], value, atol=1e-5, rtol=1e-5)
