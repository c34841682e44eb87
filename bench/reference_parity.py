"""Do our model and the reference code compute the same thing from the same weights?

Builds the reference's BertForMultiModalPreTraining (a vilbert-multi-task checkout at PATH, imported
from there, never copied) with its own random initialisation, saves its state dict as a reference
`pytorch_model.bin` with the reference's JSON config, loads that file through our loader
(`ViLBERTForPretraining.from_pretrained`: the key mapping of vilbert_core/convert.py), and runs both
in eval mode on the same padded batch. Printed: the largest differences of the text and region
streams' outputs, the pooled vectors, the MLM logits (real tokens), the MRM logits (real regions)
and the alignment probability (the reference's softmax index 0 "aligned" against our sigmoid).
With `--tasks`, the same for VILBertForVLTasks against ViLBERTForTasks: the pair, region and token
logits (the answer classifier's layout differs between reference versions; see the output).

    .venv/bin/python bench/reference_parity.py --compare-reference ../vilbert-multi-task
    .venv/bin/python bench/reference_parity.py --compare-reference ../vilbert-multi-task --config tiny --tasks
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_code import load_reference, reference_config  # noqa: E402

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks  # noqa: E402


def padded_batch(cfg: ViLBERTConfig, batch: int, tokens: int, regions: int) -> dict[str, torch.Tensor]:
    """Random inputs with some padded tokens and regions (the masks are where models most often differ)."""
    g = torch.Generator().manual_seed(0)
    text_len = torch.randint(3, tokens + 1, (batch,), generator=g)
    text_len[0] = tokens
    region_len = torch.randint(2, regions + 1, (batch,), generator=g)
    region_len[0] = regions
    attention_mask = (torch.arange(tokens) < text_len[:, None]).long()
    image_mask = (torch.arange(regions) < region_len[:, None]).long()
    return {
        "input_ids": torch.randint(5, cfg.vocab_size, (batch, tokens), generator=g) * attention_mask,
        "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "attention_mask": attention_mask,
        "image_feat": torch.randn(batch, regions, cfg.v_feature_size, generator=g) * image_mask[..., None],
        "image_loc": torch.rand(batch, regions, 5, generator=g),
        "image_mask": image_mask,
    }


def _as_reference_file(ref: torch.nn.Module, ref_cfg: Any, folder: Path) -> Path:
    """The reference model as its own checkpoint files: pytorch_model.bin and its JSON config."""
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    values = {k: v for k, v in ref_cfg.__dict__.items() if isinstance(v, int | float | str | bool | list)}
    (folder / "config.json").write_text(json.dumps(values))
    return folder


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference, and relative to the larger tensor's largest magnitude."""
    a, b = a.double(), b.double()
    d = (a - b).abs().max().item()
    return {"max_abs": d, "max_rel": d / max(a.abs().max().item(), b.abs().max().item(), 1e-30)}


def _reference_inputs(x: dict[str, torch.Tensor]) -> tuple:
    """The reference forward's positional inputs."""
    return (x["input_ids"], x["image_feat"], x["image_loc"], x["token_type_ids"], x["attention_mask"], x["image_mask"])


@torch.no_grad()
def pretraining_parity(path: str, cfg: ViLBERTConfig, x: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Both pretraining models from the reference's weights: differences of every output."""
    module = load_reference(path)
    ref_cfg = reference_config(module, cfg)
    torch.manual_seed(1)
    ref = module.BertForMultiModalPreTraining(ref_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours = ViLBERTForPretraining.from_pretrained(_as_reference_file(ref, ref_cfg, Path(tmp)), config=cfg).eval()
    args = _reference_inputs(x)
    seq_t, seq_v, pooled_t, pooled_v, _ = ref.bert(*args, output_all_encoded_layers=False)
    mlm_ref, mrm_ref, align_ref = ref.cls(seq_t, seq_v, pooled_t, pooled_v)
    out = ours(**x)
    text_real, region_real = x["attention_mask"].bool(), x["image_mask"].bool()
    ours_losses, ref_losses = _pretraining_losses(ours, ref, cfg, x)
    return {
        **{f"{name} loss": _diff(ours_losses[name], ref_losses[name]) for name in ("mlm", "mrm", "align")},
        "text stream (real tokens)": _diff(out.text_hidden[text_real], seq_t[text_real]),
        "region stream (real regions)": _diff(out.visual_hidden[region_real], seq_v[region_real]),
        "MLM logits (real tokens)": _diff(out.mlm_logits[text_real], mlm_ref[text_real]),
        "MRM logits (real regions)": _diff(out.mrm_logits[region_real], mrm_ref[region_real]),
        "alignment P(aligned)": _diff(torch.sigmoid(out.align_logit), align_ref.softmax(-1)[:, 0]),
    }


def _pretraining_losses(
    ours: torch.nn.Module, ref: torch.nn.Module, cfg: ViLBERTConfig, x: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The three pretraining losses of both models on one masking of the batch, half of it misaligned.

    Ours takes the labels as our trainer makes them; the reference gets them in its conventions, with
    the misaligned pairs' token and region labels blanked (its dataset does that; our loss skips them).
    """
    from reference_code import reference_pretraining_inputs

    from vilbert_core.training.losses import pretraining_losses, pretraining_positions
    from vilbert_core.training.masking import mask_regions, mask_tokens

    g = torch.Generator().manual_seed(5)
    b, r = x["image_mask"].shape
    ids, mlm_labels = mask_tokens(x["input_ids"], x["attention_mask"], mask_token_id=4, vocab_size=cfg.vocab_size,
                                  special_token_ids=(0, 1, 2, 3), generator=g, mask_prob=0.5)  # fmt: skip
    feat, region_labels = mask_regions(x["image_feat"], x["image_mask"], generator=g, mask_prob=0.5)
    image_target = torch.rand(b, r, cfg.v_target_size, generator=g).softmax(-1)
    align_label = (torch.arange(b) % 2 == 0).long()  # pairs 0, 2, ... aligned
    inputs = {**x, "input_ids": ids, "image_feat": feat}
    tokens, regions = pretraining_positions(mlm_labels, region_labels, align_label)
    out = ours(**inputs, mlm_positions=tokens, mrm_positions=regions)
    ours_losses = pretraining_losses(out, mlm_labels, region_labels, image_target, align_label)
    kept = align_label.bool()[:, None]
    ref_args = reference_pretraining_inputs(inputs, mlm_labels.masked_fill(~kept, -100),
                                            region_labels.masked_fill(~kept, -100), image_target, align_label)  # fmt: skip
    mlm, mrm, align = (loss.squeeze(0) for loss in ref(**ref_args)[:3])
    return ours_losses, {"mlm": mlm, "mrm": mrm, "align": align}


@torch.no_grad()
def tasks_parity(path: str, cfg: ViLBERTConfig, x: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Both task models from the reference's weights: the heads whose layout both versions share."""
    module = load_reference(path)
    ref_cfg = reference_config(module, cfg)
    torch.manual_seed(2)
    ref = module.VILBertForVLTasks(ref_cfg, num_labels=cfg.num_answers, default_gpu=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours, report = ViLBERTForTasks.from_pretrained(_as_reference_file(ref, ref_cfg, Path(tmp)), config=cfg,
                                                       output_loading_info=True)  # fmt: skip
    ours.eval()
    outputs = ref(*_reference_inputs(x))
    vil_logit, vision_logit, linguisic_logit = outputs[1], outputs[4], outputs[6]
    out = ours(**x)
    text_real, region_real = x["attention_mask"].bool(), x["image_mask"].bool()
    return {
        "pair logit": _diff(out.pair_logit, vil_logit.squeeze(-1)),
        "region logits (real regions)": _diff(out.region_logits[region_real], vision_logit.squeeze(-1)[region_real]),
        "token logits (real tokens)": _diff(out.token_logits[text_real], linguisic_logit.squeeze(-1)[text_real]),
        "reference tensors not loaded": sorted(report.skipped),
        "our heads left fresh": sorted(report.fresh),
    }


def main() -> None:
    """Print the differences; exit 1 when one exceeds the tolerance."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare-reference", required=True, metavar="PATH", help="a vilbert-multi-task checkout")
    ap.add_argument("--config", default="vilbert-base", help="ViLBERTConfig preset")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--regions", type=int, default=37)
    ap.add_argument("--tasks", action="store_true", help="also VILBertForVLTasks against ViLBERTForTasks")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference accepted")
    a = ap.parse_args()
    cfg = ViLBERTConfig.preset(a.config, v_feature_size=2048 if a.config == "vilbert-base" else 48)
    x = padded_batch(cfg, a.batch, a.tokens, a.regions)
    results = {"pretraining": pretraining_parity(a.compare_reference, cfg, x)}
    if a.tasks:
        results["tasks"] = tasks_parity(a.compare_reference, cfg, x)
    worst = 0.0
    print(f"{a.config}, batch {a.batch}, {a.tokens} tokens, {a.regions} regions, fp32, eval mode; torch {torch.__version__}")
    print("\n| model | output | max abs diff | max rel diff |\n|---|---|---|---|")
    for model, rows in results.items():
        for name, d in rows.items():
            if isinstance(d, dict):
                worst = max(worst, d["max_rel"])
                print(f"| {model} | {name} | {d['max_abs']:.2e} | {d['max_rel']:.2e} |")
    for model, rows in results.items():
        for name, value in rows.items():
            if isinstance(value, list):
                print(f"\n{model}: {name}: {', '.join(value) or 'none'}")
    print(f"\nlargest relative difference {worst:.2e} (tolerance {a.tolerance:.0e}): {'SAME' if worst <= a.tolerance else 'DIFFERENT'}")
    sys.exit(0 if worst <= a.tolerance else 1)


if __name__ == "__main__":
    main()
