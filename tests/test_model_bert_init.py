"""init_text_from_bert: a tiny random Hugging Face BERT gives the same text outputs inside ViLBERT."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks, init_text_from_bert

transformers = pytest.importorskip("transformers")


def _bert_config() -> transformers.BertConfig:
    """Tiny BERT with the same text sizes as the tiny ViLBERT preset."""
    return transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
    )


def _vilbert_config(**overrides: object) -> ViLBERTConfig:
    """Tiny ViLBERT preset with overrides."""
    return ViLBERTConfig.preset("tiny", **overrides)


def _inputs(cfg: ViLBERTConfig) -> dict[str, torch.Tensor]:
    """A batch with three padded tokens in sample 0."""
    g = torch.Generator().manual_seed(0)
    b, t, r = 2, 9, 4
    return {
        "input_ids": torch.randint(1, cfg.vocab_size, (b, t), generator=g),
        "token_type_ids": torch.randint(0, 2, (b, t), generator=g),
        "attention_mask": torch.tensor([[1] * 6 + [0] * 3, [1] * 9]),
        "image_feat": torch.randn(b, r, cfg.v_feature_size, generator=g),
        "image_loc": torch.rand(b, r, 5, generator=g),
        "image_mask": torch.ones(b, r, dtype=torch.long),
    }


def _run_both(
    model: torch.nn.Module, bert: torch.nn.Module, cfg: ViLBERTConfig, **bert_kwargs: object
) -> tuple[object, object, torch.Tensor]:
    """Our model's and BERT's outputs on the same batch, and the (B,T) mask of the real tokens."""
    inputs = _inputs(cfg)
    text = {k: inputs[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        return model(**inputs), bert(**text, **bert_kwargs), inputs["attention_mask"].bool()


@pytest.mark.parametrize("file_format", ["safetensors", "bin_gamma_beta"])
def test_text_stream_equals_transformers_bert(tmp_path: Path, file_format: str) -> None:
    """With co-attention disabled, text_hidden and mlm_logits equal BertForPreTraining's on real tokens."""
    torch.manual_seed(0)
    bert = transformers.BertForPreTraining(_bert_config()).eval()
    if file_format == "safetensors":
        bert.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        # the original bert-base-uncased pytorch_model.bin names LayerNorm parameters gamma/beta
        state = {
            re.sub(
                r"LayerNorm\.bias$", "LayerNorm.beta", re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k)
            ): v
            for k, v in bert.state_dict().items()
        }
        assert "bert.embeddings.LayerNorm.gamma" in state
        torch.save(state, tmp_path / "pytorch_model.bin")

    cfg = _vilbert_config(with_coattention=False)
    model = ViLBERTForPretraining(cfg).eval()
    report = init_text_from_bert(model, tmp_path)
    assert report.source_format == "bert"
    assert any(k.startswith("cls.seq_relationship") for k in report.skipped)  # NSP head is not used
    assert "vilbert.text_layers.3.ffn.output.weight" in report.loaded

    ours, theirs, keep = _run_both(model, bert, cfg, output_hidden_states=True)
    torch.testing.assert_close(ours.text_hidden[keep], theirs.hidden_states[-1][keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.mlm_logits[keep], theirs.prediction_logits[keep], atol=1e-4, rtol=1e-5)


def test_bare_bertmodel_folder_into_tasks_model(tmp_path: Path) -> None:
    """A BertModel folder (names without "bert.") initialises a tasks model; the visual stream is untouched."""
    torch.manual_seed(1)
    bert = transformers.BertModel(_bert_config(), add_pooling_layer=True).eval()
    bert.save_pretrained(tmp_path)
    cfg = _vilbert_config(with_coattention=False)
    model = ViLBERTForTasks(cfg).eval()
    visual_before = model.vilbert.visual_layers[0].ffn.output.weight.clone()
    report = init_text_from_bert(model, tmp_path)
    assert any(k.startswith("pooler.") for k in report.skipped)  # BERT's tanh pooler is not ViLBERT's
    assert torch.equal(model.vilbert.visual_layers[0].ffn.output.weight, visual_before)
    ours, theirs, keep = _run_both(model, bert, cfg)
    torch.testing.assert_close(ours.text_hidden[keep], theirs.last_hidden_state[keep], atol=1e-5, rtol=1e-5)


def test_bert_with_other_sizes_is_refused(tmp_path: Path) -> None:
    """A BERT whose widths or depth differ from the text stream raises an error naming the tensors."""
    torch.manual_seed(2)
    transformers.BertModel(_bert_config()).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"word_embeddings\.weight: BERT \(128, 32\) vs model \(128, 48\)"):
        init_text_from_bert(ViLBERTForPretraining(_vilbert_config(hidden_size=48)), tmp_path / "bert")
    with pytest.raises(ValueError, match="more layers"):
        init_text_from_bert(
            ViLBERTForPretraining(_vilbert_config(num_hidden_layers=3, t_biattention_id=[2, 3])),
            tmp_path / "bert",
        )
    with pytest.raises(FileNotFoundError, match="neither"):
        init_text_from_bert(ViLBERTForPretraining(_vilbert_config()), tmp_path)
