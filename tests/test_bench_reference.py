"""`--compare-reference PATH` of bench/bench_model.py and bench/bench_eval.py, against a stand-in for the
reference code written here: the reference's class names, constructor and forward signatures (its
vilbert/vilbert.py API), tiny bodies. The real comparison needs a vilbert-multi-task checkout."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"

STAND_IN = '''
"""A stand-in with the reference's API: BertConfig.from_dict, BertForMultiModalPreTraining, VILBertForVLTasks."""
import torch
import torch.nn.functional as F
from torch import nn

CALLS = []  # (class name, keyword arguments) of every forward call, for the test to inspect


class BertConfig:
    def __init__(self, vocab_size_or_config_json_file, hidden_size=768, v_feature_size=2048, v_target_size=1601):
        self.vocab_size = vocab_size_or_config_json_file
        self.hidden_size, self.v_feature_size, self.v_target_size = hidden_size, v_feature_size, v_target_size

    @classmethod
    def from_dict(cls, json_object):
        config = BertConfig(vocab_size_or_config_json_file=-1)
        for key, value in json_object.items():
            config.__dict__[key] = value
        return config


class _Streams(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text = nn.Embedding(config.vocab_size, 8)
        self.image = nn.Linear(config.v_feature_size, 8)


class BertForMultiModalPreTraining(_Streams):
    def __init__(self, config):
        super().__init__(config)
        self.mlm = nn.Linear(8, config.vocab_size)
        self.mrm = nn.Linear(8, config.v_target_size)
        self.nsp = nn.Linear(8, 2)

    def forward(self, input_ids, image_feat, image_loc, token_type_ids=None, attention_mask=None,
                image_attention_mask=None, masked_lm_labels=None, image_label=None, image_target=None,
                next_sentence_label=None, output_all_attention_masks=False):
        CALLS.append(("pretraining", dict(input_ids=input_ids, image_feat=image_feat, masked_lm_labels=masked_lm_labels,
                                         image_label=image_label, image_target=image_target,
                                         next_sentence_label=next_sentence_label)))
        t, v = self.text(input_ids), self.image(image_feat)
        mlm = F.cross_entropy(self.mlm(t).flatten(0, 1), masked_lm_labels.flatten(), ignore_index=-1)
        kl = F.kl_div(self.mrm(v)[:, 1:].log_softmax(-1), image_target, reduction="none").sum(-1)
        img = (kl * (image_label == 1)).sum() / (image_label == 1).sum()
        nsp = F.cross_entropy(self.nsp(t[:, 0] * v[:, 0]), next_sentence_label)
        return mlm.unsqueeze(0), img.unsqueeze(0), nsp.unsqueeze(0)


class VILBertForVLTasks(_Streams):
    def __init__(self, config, num_labels, dropout_prob=0.1, default_gpu=True):
        super().__init__(config)
        self.vil_prediction = nn.Linear(8, num_labels)
        self.vil_logit = nn.Linear(8, 1)

    def forward(self, input_txt, input_imgs, image_loc, token_type_ids=None, attention_mask=None,
                image_attention_mask=None, co_attention_mask=None, task_ids=None, output_all_encoded_layers=False):
        CALLS.append(("tasks", dict(input_txt=input_txt, input_imgs=input_imgs, image_attention_mask=image_attention_mask)))
        pooled = self.text(input_txt)[:, 0] * self.image(input_imgs)[:, 0]
        return self.vil_prediction(pooled), self.vil_logit(pooled), 0, 0, 0, 0, 0
'''


@pytest.fixture
def reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A checkout-like folder holding vilbert/vilbert.py = the stand-in; bench/ importable; cleaned up after."""
    (tmp_path / "vilbert").mkdir()
    (tmp_path / "vilbert" / "__init__.py").write_text("")
    (tmp_path / "vilbert" / "vilbert.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    yield tmp_path
    for name in ("vilbert.vilbert", "vilbert"):
        sys.modules.pop(name, None)


def _args(reference: Path, **extra: object) -> argparse.Namespace:
    """bench_model options for a fast tiny run."""
    values = dict(config="tiny", device="cpu", batch=4, tokens=9, regions=5, steps=2, warmup=1,
                  compare_reference=str(reference))  # fmt: skip
    return argparse.Namespace(**(values | extra))


def test_bench_model_times_ours_and_the_reference_interleaved(reference: Path) -> None:
    bench_model = importlib.import_module("bench_model")
    rows = bench_model.compare_steps(_args(reference), "reference")
    stand_in = sys.modules["vilbert.vilbert"]
    # like for like at each precision, and ours in bf16 against the reference in fp32 (the issue's bf16 target)
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "ours bf16 vs reference fp32"]
    assert rows[2]["ours_samples_per_s"] == rows[1]["ours_samples_per_s"]
    assert rows[2]["other_samples_per_s"] == rows[0]["other_samples_per_s"]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["ours_samples_per_s"] / r["other_samples_per_s"])
        assert len(r["ratio_per_round"]) == 2 and all(math.isfinite(x) and x > 0 for x in r["ratio_per_round"])
    # 2 precisions x (warm-up + 2 steps), and each call got our masked batch in the reference's conventions
    calls = [kw for name, kw in stand_in.CALLS if name == "pretraining"]
    assert len(calls) == 6
    kw = calls[0]
    assert kw["input_ids"].shape == (4, 9) and kw["image_feat"].shape == (4, 5, 48)
    assert set(kw["masked_lm_labels"].unique().tolist()) >= {-1} and int(kw["masked_lm_labels"].min()) == -1
    assert kw["image_label"].shape == (4, 4) and set(kw["image_label"].unique().tolist()) <= {-1, 1}
    assert kw["image_target"].shape == (4, 4, 11)  # the detected regions, not the global one
    assert kw["next_sentence_label"].dtype == torch.long
    assert kw["next_sentence_label"].tolist() == [0, 1, 0, 1]  # 0 = aligned: the batch aligns every other pair
    # the reference's labels mark exactly the tokens our masking replaced: some masked, the rest -1
    assert 0 < int((kw["masked_lm_labels"] >= 0).sum()) < 4 * 9


def test_bench_model_memory_variant_of_the_reference_runs_in_its_process(reference: Path) -> None:
    bench_model = importlib.import_module("bench_model")
    row = bench_model.run_memory_variant(_args(reference), "reference")
    assert row["variant"] == "reference" and row["peak_rss_mib"] > 0 and row["steps"] == 3


def test_bench_eval_times_the_reference_forward_per_pair(reference: Path) -> None:
    bench_eval = importlib.import_module("bench_eval")
    r = bench_eval.bench_scoring("tiny", batch_size=6, rounds=2, device="cpu", precision="fp32",
                                 reference=str(reference))  # fmt: skip
    stand_in = sys.modules["vilbert.vilbert"]
    calls = [kw for name, kw in stand_in.CALLS if name == "tasks"]
    assert len(calls) == 3  # warm-up round + 2 timed rounds
    assert calls[0]["input_txt"].shape == (6, 20) and calls[0]["input_imgs"].shape == (6, 37, 48)
    hours = r["flickr30k_1k_test_hours"]
    assert r["speedup_vs_reference"] == pytest.approx(hours["reference"] / hours["cached"])
    assert hours["reference"] == pytest.approx(5_000_000 / r["pairs_per_s"]["reference"] / 3600)
    assert set(r["pairs_per_s"]) == {"full", "pairs", "text", "image", "reference"}


def test_bench_eval_bf16_times_the_rerank_parts_and_the_reference_in_fp32(reference: Path) -> None:
    bench_eval = importlib.import_module("bench_eval")
    r = bench_eval.bench_scoring("tiny", batch_size=6, rounds=2, device="cpu", precision="bf16",
                                 reference=str(reference), rerank_k=7)  # fmt: skip
    stand_in = sys.modules["vilbert.vilbert"]
    calls = [kw for name, kw in stand_in.CALLS if name == "tasks"]
    assert len(calls) == 6  # the reference under autocast and in fp32, each warm-up + 2 rounds
    assert set(r["pairs_per_s"]) == {"full", "pairs", "text", "image", "reference", "pairs_fp32", "text_fp32",
                                     "reference_fp32"}  # fmt: skip
    s, hours = r["seconds_per_item"], r["flickr30k_1k_test_hours"]
    # the bf16 pass, every caption's text layers in fp32, and at most 7 x (1000 + 5000) pairs in fp32
    want = hours["cached"] + (5000 * s["text_fp32"] + 7 * 6000 * s["pairs_fp32"]) / 3600
    assert hours["cached_rerank7"] == pytest.approx(want)
    ratios = r["speedups_vs_reference"]
    assert ratios["cached_rerank7 vs reference_fp32"] == pytest.approx(hours["reference_fp32"] / hours["cached_rerank7"])
    assert set(ratios) == {f"{o} vs {ref}" for o in ("cached", "cached_rerank7") for ref in ("reference", "reference_fp32")}


def test_a_folder_without_the_reference_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    reference_code = importlib.import_module("reference_code")
    with pytest.raises(SystemExit, match="no vilbert/vilbert.py"):
        reference_code.load_reference(tmp_path)


def test_bench_model_compares_the_step_before_issue_17(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    bench_model = importlib.import_module("bench_model")
    rows = bench_model.compare_steps(_args(Path("unused"), steps=1, warmup=0), "before")
    assert [(r["precision"], r["other"]) for r in rows] == [
        ("fp32", "before"), ("bf16", "before"), ("ours bf16 vs before fp32", "before")]  # fmt: skip
    assert all(r["ratio"] > 0 and len(r["ratio_per_round"]) == 1 for r in rows)
