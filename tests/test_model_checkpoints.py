"""ViLBERT checkpoints: reference key lists, reference pytorch_model.bin loading, save/load round trips, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.convert import normalize_reference_name, reference_to_project

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
KEY_LISTS = {"pretraining": "vilbert_keys_pretraining.txt", "vltasks": "vilbert_keys_vltasks.txt"}
# reference tensors the loader drops on purpose (vilbert.md: the q_dense layers the reference forward never uses)
DOCUMENTED_SKIPS = re.compile(r".*biOutput\.q_dense[12]\..*")
GQA_ANSWERS = 1533  # the multi-task reference's GQA head
TASK_HEADS = ("vqa_head", "pair_head", "region_head", "binary_head", "tri_head", "token_head")  # gqa_head: optional


def _read_key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) rows of a reference key list; skips the test when shared/reference is absent."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip("shared/reference is not available")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split()
            rows.append((key, tuple(int(x) for x in shape.split("x"))))
    return rows


# ------------------------------------------------------------------ key lists, paper size
@pytest.mark.parametrize("which", ["pretraining", "vltasks"])
def test_reference_key_lists_map_both_ways(which: str) -> None:
    """Every reference key maps to one of our tensors with the same shape (or is a documented skip), and back."""
    rows = _read_key_list(KEY_LISTS[which])
    assert len(rows) == {"pretraining": 533, "vltasks": 559}[which]
    model_cls = ViLBERTForPretraining if which == "pretraining" else ViLBERTForTasks
    with torch.device("meta"):  # paper size without allocating 240M parameters
        model = model_cls(ViLBERTConfig.preset("vilbert-base", num_gqa_answers=GQA_ANSWERS))
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    covered: set[str] = set()
    for key, shape in rows:
        ours, reason = reference_to_project(key)
        if ours is None:
            assert DOCUMENTED_SKIPS.fullmatch(key), f"{key} is skipped without being documented: {reason}"
            continue
        if which == "vltasks" and key.startswith("cls."):
            # the multi-task model still carries the pretraining heads; ViLBERTForTasks reports and skips them
            assert ours.split(".")[0] in ("mlm_head", "mrm_head", "align_head") and ours not in own
            continue
        assert ours in own, f"{key} -> {ours} is not a tensor of {model_cls.__name__}"
        expected = (
            (1, *shape[1:]) if key.startswith("cls.bi_seq_relationship") else shape
        )  # two-way -> one logit
        assert own[ours] == expected, f"{key} {shape} -> {ours} {own[ours]}"
        assert ours not in covered, f"two reference keys map to {ours}"
        covered.add(ours)
    assert set(own) - covered == set(), "tensors of ours with no reference key"


# ------------------------------------------------------------------ a tiny reference checkpoint
def _tiny_cfg() -> ViLBERTConfig:
    """Tiny config, no dropout; every width differs so a transposed mapping fails on shape."""
    return ViLBERTConfig.preset(
        "tiny",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        v_hidden_dropout_prob=0.0,
        v_attention_probs_dropout_prob=0.0,
    )


def _tiny_reference_state_dict(cfg: ViLBERTConfig, which: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the reference key list's names, cut down to the tiny config's layer counts."""
    limits = {
        "layer": cfg.num_hidden_layers,
        "v_layer": cfg.v_num_hidden_layers,
        "c_layer": cfg.num_co_layers,
    }
    sizes = {  # widths of the tiny config, by the role each paper dimension plays in the name
        "t": cfg.hidden_size,
        "v": cfg.v_hidden_size,
        "bi": cfg.bi_hidden_size,
    }
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in ViLBERTForPretraining(cfg).state_dict().items()}
        tasks_cfg = dataclasses.replace(cfg, num_gqa_answers=cfg.num_gqa_answers or 5)
        shapes |= {n: tuple(t.shape) for n, t in ViLBERTForTasks(tasks_cfg).state_dict().items()}
    state = {}
    for key, _paper_shape in _read_key_list(KEY_LISTS[which]):
        m = re.match(r"bert\.encoder\.(layer|v_layer|c_layer)\.(\d+)\.", key)
        if m and int(m.group(2)) >= limits[m.group(1)]:
            continue
        ours, _ = reference_to_project(key)
        if ours is not None:
            shape = shapes[ours]
            if key.startswith("cls.bi_seq_relationship"):
                shape = (2, *shape[1:])
        elif "q_dense1" in key:
            shape = (sizes["v"], sizes["bi"]) if key.endswith("weight") else (sizes["v"],)
        elif "q_dense2" in key:
            shape = (sizes["t"], sizes["bi"]) if key.endswith("weight") else (sizes["t"],)
        else:
            raise AssertionError(f"{key} neither maps nor is a q_dense layer")
        scale = 0.3 if not key.endswith("LayerNorm.weight") else 0.1
        offset = 1.0 if key.endswith("LayerNorm.weight") else 0.0
        state[key] = offset + scale * torch.randn(shape, generator=g)
    state["cls.predictions.decoder.weight"] = state[
        "bert.embeddings.word_embeddings.weight"
    ]  # tied, as saved
    return state


def _lin(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b with the reference-named weight and bias."""
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ln(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """The reference's own LayerNorm formula (eps 1e-12 inside the square root)."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return sd[name + ".weight"] * (x - u) / torch.sqrt(s + 1e-12) + sd[name + ".bias"]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact erf GELU, as written in the reference."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ext_mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Per-head loop; ext_mask is the reference's additive (B,S) mask."""
    d = q.size(-1) // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        p = (q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d) + ext_mask[:, None, :]).softmax(-1)
        out[..., sl] = p @ v[..., sl]
    return out


def _ref_layer(sd: dict, p: str, x: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """One reference BertLayer / BertImageLayer by its tensor names."""
    ctx = _attn(
        _lin(sd, p + "attention.self.query", x),
        _lin(sd, p + "attention.self.key", x),
        _lin(sd, p + "attention.self.value", x),
        mask,
        heads,
    )
    a = _ln(sd, p + "attention.output.LayerNorm", _lin(sd, p + "attention.output.dense", ctx) + x)
    return _ln(
        sd,
        p + "output.LayerNorm",
        _lin(sd, p + "output.dense", _gelu(_lin(sd, p + "intermediate.dense", a))) + a,
    )


def _reference_forward(sd: dict, cfg: ViLBERTConfig, inp: dict) -> dict[str, torch.Tensor]:
    """The reference model written out from vilbert.md with the reference's own tensor names."""
    t_mask = (1.0 - inp["attention_mask"].float()) * -10000.0
    v_mask = (1.0 - inp["image_mask"].float()) * -10000.0
    ids = inp["input_ids"]
    e = "bert.embeddings."
    txt = sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][: ids.size(1)][None]
    txt = _ln(sd, e + "LayerNorm", txt + sd[e + "token_type_embeddings.weight"][inp["token_type_ids"]])
    ve = "bert.v_embeddings."
    img = _lin(sd, ve + "image_embeddings", inp["image_feat"]) + _lin(
        sd, ve + "image_location_embeddings", inp["image_loc"]
    )
    img = _ln(sd, ve + "LayerNorm", img)
    t_start = v_start = 0
    for k, (v_end, t_end) in enumerate(zip(cfg.v_biattention_id, cfg.t_biattention_id, strict=True)):
        for i in range(t_start, t_end):
            txt = _ref_layer(sd, f"bert.encoder.layer.{i}.", txt, t_mask, cfg.num_attention_heads)
        for i in range(v_start, v_end):
            img = _ref_layer(sd, f"bert.encoder.v_layer.{i}.", img, v_mask, cfg.v_num_attention_heads)
        c = f"bert.encoder.c_layer.{k}."
        b = c + "biattention."
        h = cfg.bi_num_attention_heads
        ctx1 = _attn(
            _lin(sd, b + "query2", txt), _lin(sd, b + "key1", img), _lin(sd, b + "value1", img), v_mask, h
        )
        ctx2 = _attn(
            _lin(sd, b + "query1", img), _lin(sd, b + "key2", txt), _lin(sd, b + "value2", txt), t_mask, h
        )
        img_a = _ln(sd, c + "biOutput.LayerNorm1", _lin(sd, c + "biOutput.dense1", ctx2) + img)
        txt_a = _ln(sd, c + "biOutput.LayerNorm2", _lin(sd, c + "biOutput.dense2", ctx1) + txt)
        img = _ln(
            sd,
            c + "v_output.LayerNorm",
            _lin(sd, c + "v_output.dense", _gelu(_lin(sd, c + "v_intermediate.dense", img_a))) + img_a,
        )
        txt = _ln(
            sd,
            c + "t_output.LayerNorm",
            _lin(sd, c + "t_output.dense", _gelu(_lin(sd, c + "t_intermediate.dense", txt_a))) + txt_a,
        )
        t_start, v_start = t_end, v_end
    for i in range(v_start, cfg.v_num_hidden_layers):
        img = _ref_layer(sd, f"bert.encoder.v_layer.{i}.", img, v_mask, cfg.v_num_attention_heads)
    for i in range(t_start, cfg.num_hidden_layers):
        txt = _ref_layer(sd, f"bert.encoder.layer.{i}.", txt, t_mask, cfg.num_attention_heads)
    pooled = torch.relu(_lin(sd, "bert.t_pooler.dense", txt[:, 0])) * torch.relu(
        _lin(sd, "bert.v_pooler.dense", img[:, 0])
    )
    out = {"text_hidden": txt, "visual_hidden": img, "pooled": pooled}
    if "cls.predictions.bias" in sd:
        tr = _ln(
            sd, "cls.predictions.transform.LayerNorm", _gelu(_lin(sd, "cls.predictions.transform.dense", txt))
        )
        out["mlm_logits"] = tr @ sd["cls.predictions.decoder.weight"].T + sd["cls.predictions.bias"]
        tv = _ln(
            sd,
            "cls.imagePredictions.transform.LayerNorm",
            _gelu(_lin(sd, "cls.imagePredictions.transform.dense", img)),
        )
        out["mrm_logits"] = _lin(sd, "cls.imagePredictions.decoder", tv)
        out["p_aligned"] = _lin(sd, "cls.bi_seq_relationship", pooled).softmax(-1)[:, 0]  # index 0 = aligned
    if "vil_logit.weight" in sd:
        fc = "vil_prediction.logit_fc."
        out["vqa_logits"] = _lin(sd, fc + "3", _ln(sd, fc + "2", _gelu(_lin(sd, fc + "0", pooled))))
        out["pair_logit"] = _lin(sd, "vil_logit", pooled)[:, 0]
        out["region_logits"] = _lin(sd, "vision_logit", img)[..., 0] + v_mask
        fc = "vil_prediction_gqa.logit_fc."
        out["gqa_logits"] = _lin(sd, fc + "3", _ln(sd, fc + "2", _gelu(_lin(sd, fc + "0", pooled))))
        out["tri_logits"] = _lin(sd, "vil_tri_prediction", pooled)
        out["token_logits"] = _lin(sd, "linguisic_logit", txt)[..., 0] + t_mask
        if pooled.shape[0] % 2 == 0:  # the reference's NLVR2 head: consecutive rows are one pair's two images
            two = pooled.reshape(-1, 2 * pooled.shape[1])
            fc = "vil_binary_prediction.logit_fc."
            out["binary_logits"] = _lin(sd, fc + "3", _ln(sd, fc + "2", _gelu(_lin(sd, fc + "0", two))))
    return out


def _inputs(cfg: ViLBERTConfig) -> dict[str, torch.Tensor]:
    """A small batch with padded tokens in sample 0 and padded regions in sample 1."""
    g = torch.Generator().manual_seed(5)
    b, t, r = 2, 6, 5
    return {
        "input_ids": torch.randint(1, cfg.vocab_size, (b, t), generator=g),
        "token_type_ids": torch.randint(0, 2, (b, t), generator=g),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]),
        "image_feat": torch.randn(b, r, cfg.v_feature_size, generator=g),
        "image_loc": torch.rand(b, r, 5, generator=g),
        "image_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
    }


def _close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """assert_close with the tensor's name in the message."""
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_reference_pretraining_checkpoint_matches_reference_forward(tmp_path: Path) -> None:
    """A reference-named pytorch_model.bin loads and reproduces the reference computation, heads included."""
    cfg = _tiny_cfg()
    sd = _tiny_reference_state_dict(cfg, "pretraining")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model, report = ViLBERTForPretraining.from_pretrained(tmp_path, config=cfg, output_loading_info=True)
    assert report.source_format == "reference" and report.fresh == []
    assert set(report.skipped) == {k for k in sd if "q_dense" in k} | {"cls.predictions.decoder.weight"}
    inp = _inputs(cfg)
    with torch.no_grad():
        ours = model(**inp)
        ref = _reference_forward(sd, cfg, inp)
    keep_t, keep_v = inp["attention_mask"].bool(), inp["image_mask"].bool()
    _close(ours.text_hidden[keep_t], ref["text_hidden"][keep_t], "text_hidden")
    _close(ours.visual_hidden[keep_v], ref["visual_hidden"][keep_v], "visual_hidden")
    _close(ours.pooled, ref["pooled"], "pooled")
    _close(ours.mlm_logits[keep_t], ref["mlm_logits"][keep_t], "mlm_logits")
    _close(ours.mrm_logits[keep_v], ref["mrm_logits"][keep_v], "mrm_logits")
    # the single alignment logit is exactly the two-way head's probability of "aligned"
    _close(torch.sigmoid(ours.align_logit), ref["p_aligned"], "align")


def test_reference_multitask_checkpoint_heads(tmp_path: Path) -> None:
    """Every multi-task head gives the reference's logits: VQA, GQA, pair, regions, three-way, tokens, two-image."""
    cfg = _tiny_cfg()
    sd = _tiny_reference_state_dict(cfg, "vltasks", seed=1)
    sd["bert.embeddings.task_embeddings.weight"] = torch.randn(20, cfg.hidden_size)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model, report = ViLBERTForTasks.from_pretrained(
        tmp_path, config=cfg, num_answers=7, output_loading_info=True
    )
    assert model.config.num_gqa_answers == 5  # the GQA head's size, read from the checkpoint
    assert "bert.embeddings.task_embeddings.weight" in report.skipped
    assert "not a parameter of ViLBERTForTasks" in report.skipped["cls.predictions.bias"]
    assert report.fresh == []
    inp = _inputs(cfg)
    with torch.no_grad():
        ours = model(**inp)
        ref = _reference_forward(sd, cfg, inp)
    _close(ours.vqa_logits, ref["vqa_logits"], "vqa_logits")
    _close(ours.pair_logit, ref["pair_logit"], "pair_logit")
    keep_v = inp["image_mask"].bool()
    _close(ours.region_logits[keep_v], ref["region_logits"][keep_v], "region_logits")
    assert torch.all(ours.region_logits[~keep_v] == -10000.0)
    _close(ours.gqa_logits, ref["gqa_logits"], "gqa_logits")
    _close(ours.tri_logits, ref["tri_logits"], "tri_logits")
    keep_t = inp["attention_mask"].bool()
    _close(ours.token_logits[keep_t], ref["token_logits"][keep_t], "token_logits")
    # the two-image head: sample 0's text with both samples' images, as the reference batches NLVR2
    pair = {k: inp[k][:1].repeat(2, 1) for k in ("input_ids", "token_type_ids", "attention_mask")}
    pair |= {k: inp[k] for k in ("image_feat", "image_loc", "image_mask")}
    with torch.no_grad():
        binary = model.image_pair_logits(
            inp["input_ids"][:1], inp["image_feat"][None], inp["image_loc"][None], inp["token_type_ids"][:1],
            inp["attention_mask"][:1], inp["image_mask"][None],
        )  # fmt: skip
    _close(binary, _reference_forward(sd, cfg, pair)["binary_logits"], "binary_logits")


def test_gamma_beta_and_module_prefix_load_identically(tmp_path: Path) -> None:
    """Old LayerNorm gamma/beta names and a DataParallel module. prefix give the same model."""
    cfg = _tiny_cfg()
    sd = _tiny_reference_state_dict(cfg, "pretraining", seed=2)
    old = {}
    for k, v in sd.items():
        k = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k)
        old["module." + re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)] = v
    assert (
        normalize_reference_name("module.bert.embeddings.LayerNorm.gamma")
        == "bert.embeddings.LayerNorm.weight"
    )
    torch.save(sd, tmp_path / "new.bin")
    torch.save(old, tmp_path / "old.bin")
    a = ViLBERTForPretraining.from_pretrained(tmp_path / "new.bin", config=cfg).state_dict()
    b = ViLBERTForPretraining.from_pretrained(tmp_path / "old.bin", config=cfg).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["vilbert.embeddings.layer_norm.weight"], sd["bert.embeddings.LayerNorm.weight"])


def test_tasks_from_pretraining_checkpoint_starts_heads_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tasks model loaded from a pretraining checkpoint keeps the backbone, initialises its heads, says so."""
    cfg = _tiny_cfg()
    sd = _tiny_reference_state_dict(cfg, "pretraining", seed=3)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with caplog.at_level("WARNING"):
        model, report = ViLBERTForTasks.from_pretrained(
            tmp_path, config=cfg, num_answers=9, output_loading_info=True
        )
    assert sorted({n.split(".")[0] for n in report.fresh}) == sorted(TASK_HEADS)
    assert "start fresh" in caplog.text
    assert model.vqa_head.classifier.weight.shape == (9, 2 * cfg.bi_hidden_size)
    assert torch.equal(
        model.vilbert.co_layers[1].co_attention.t_query.weight,
        sd["bert.encoder.c_layer.1.biattention.query2.weight"],
    )
    assert torch.equal(
        model.vilbert.co_layers[1].co_attention.v_key.bias, sd["bert.encoder.c_layer.1.biattention.key1.bias"]
    )


# ------------------------------------------------------------------ project format
@pytest.mark.parametrize("model_cls", [ViLBERTForPretraining, ViLBERTForTasks])
def test_save_pretrained_round_trip(tmp_path: Path, model_cls: type) -> None:
    """save_pretrained writes config.json + model.safetensors; from_pretrained gives identical outputs."""
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset("tiny", vocab_size=77)
    model = model_cls(cfg).eval()
    model.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] == 77
    tensors = load_file(tmp_path / "run" / "model.safetensors")
    assert "mlm_head.decoder.weight" not in tensors  # tied copy not duplicated
    loaded = model_cls.from_pretrained(tmp_path / "run")
    assert loaded.config == cfg and not loaded.training
    inp = _inputs(cfg)
    with torch.no_grad():
        a, b = model(**inp), loaded(**inp)
    for name, value in vars(a).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(b, name)), name
    if model_cls is ViLBERTForPretraining:
        assert loaded.mlm_head.decoder.weight is loaded.vilbert.embeddings.word_embeddings.weight


def test_cross_class_load_from_project_dir(tmp_path: Path) -> None:
    """Tasks from a saved pretraining run: backbone identical, pretraining heads skipped, task heads fresh."""
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset("tiny")
    ViLBERTForPretraining(cfg).save_pretrained(tmp_path)
    pre = ViLBERTForPretraining.from_pretrained(tmp_path)
    tasks, report = ViLBERTForTasks.from_pretrained(tmp_path, output_loading_info=True)
    assert report.source_format == "project"
    assert {k.split(".")[0] for k in report.skipped} == {"mlm_head", "mrm_head", "align_head"}
    assert {k.split(".")[0] for k in report.fresh} == set(TASK_HEADS)
    for name, value in pre.vilbert.state_dict().items():
        assert torch.equal(value, tasks.vilbert.state_dict()[name]), name


def test_mis_shaped_checkpoint_error_lists_names(tmp_path: Path) -> None:
    """Wrong shapes and missing tensors raise one error naming each tensor and both shapes."""
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset("tiny")
    ViLBERTForPretraining(cfg).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError) as err:
        ViLBERTForPretraining.from_pretrained(
            tmp_path / "a", config=ViLBERTConfig.preset("tiny", v_feature_size=50)
        )
    assert "vilbert.image_embeddings.feature_proj.weight: checkpoint (24, 48) vs model (24, 50)" in str(
        err.value
    )

    tensors = load_file(tmp_path / "a" / "model.safetensors")
    tensors["vilbert.co_layers.1.co_attention.t_output.weight"] = torch.zeros(3, 3)
    del tensors["vilbert.visual_pooler.dense.bias"]
    save_file(tensors, tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError) as err:
        ViLBERTForPretraining.from_pretrained(tmp_path / "a")
    message = str(err.value)
    assert "vilbert.co_layers.1.co_attention.t_output.weight: checkpoint (3, 3) vs model (32, 16)" in message
    assert "missing from the checkpoint: vilbert.visual_pooler.dense.bias" in message
    assert "model.safetensors" in message

    sd = _tiny_reference_state_dict(cfg, "pretraining")
    sd["bert.v_pooler.dense.weight"] = torch.zeros(16, 5)
    torch.save(sd, tmp_path / "ref.bin")
    with pytest.raises(ValueError, match=r"vilbert\.visual_pooler\.dense\.weight: checkpoint \(16, 5\)"):
        ViLBERTForPretraining.from_pretrained(tmp_path / "ref.bin", config=cfg)


class _NotATensor:
    """An arbitrary class: weights_only loading must refuse it."""


def test_unsafe_or_missing_checkpoints_are_refused(tmp_path: Path) -> None:
    """Pickled objects are refused by weights_only loading; absent files get a clear error."""
    torch.save({"bert.t_pooler.dense.weight": _NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="evil.bin"):
        ViLBERTForPretraining.from_pretrained(tmp_path / "evil.bin", config=ViLBERTConfig.preset("tiny"))
    with pytest.raises(FileNotFoundError, match="neither"):
        ViLBERTForPretraining.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ViLBERTForPretraining.from_pretrained(tmp_path / "nope.bin")


def test_wrapped_project_state_dict_loads(tmp_path: Path) -> None:
    """A state dict saved from a DDP- or torch.compile-wrapped model (prefixed names) loads unchanged."""
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset("tiny")
    model = ViLBERTForTasks(cfg).eval()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "wrapped.bin")
        loaded, report = ViLBERTForTasks.from_pretrained(
            tmp_path / "wrapped.bin", config=cfg, output_loading_info=True
        )
        assert report.source_format == "project" and report.fresh == [] and report.skipped == {}
        for name, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), (prefix, name)


def test_corrupt_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    """A truncated model.safetensors is a ValueError naming the file, not a library traceback."""
    model = ViLBERTForPretraining(ViLBERTConfig.preset("tiny"))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        ViLBERTForPretraining.from_pretrained(tmp_path)
