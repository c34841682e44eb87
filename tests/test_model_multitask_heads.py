"""The multi-task reference checkpoint loads whole: every tensor of vilbert_keys_vltasks.txt, at its paper shape,
lands in a parameter (or is one the reference itself never uses), and goes back under its own name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.convert import convert_project_state_dict, project_to_reference, reference_to_project

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vilbert_keys_vltasks.txt"
NEW_HEADS = {"vil_prediction_gqa": "gqa_head", "vil_binary_prediction": "binary_head",
             "vil_tri_prediction": "tri_head", "linguisic_logit": "token_head"}  # fmt: skip
Q_DENSE = re.compile(r"bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.(weight|bias)")


def _key_rows() -> list[tuple[str, tuple[int, ...]]]:
    """(name, paper shape) of every tensor of the multi-task reference."""
    if not KEYS.is_file():
        pytest.skip("shared/reference is not available")
    rows = [line.split("\t") for line in KEYS.read_text().splitlines() if line.strip()]
    return [(name, tuple(int(x) for x in shape.split("x"))) for name, shape in rows]


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pytorch_model.bin with exactly the reference's names and paper shapes, random values.

    Each tensor is a random last-dimension vector broadcast to its shape (a view): the file and the
    state dict stay a few MB instead of 1 GB, and every tensor still differs from every other one.
    """
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape[-1], generator=g).expand(shape) for name, shape in _key_rows()}
    path = tmp_path_factory.mktemp("multitask") / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


def test_every_reference_tensor_is_loaded_by_the_tasks_or_the_pretraining_model(reference_file) -> None:
    path, state = reference_file
    assert len(state) == 559
    config = ViLBERTConfig.preset("vilbert-base")
    tasks, report = ViLBERTForTasks.from_pretrained(path, config=config, output_loading_info=True)
    assert report.fresh == []  # nothing of the model missing from the checkpoint
    assert tasks.config.num_gqa_answers == 1533 and tasks.config.num_answers == 3129
    # unused by the tasks model: only the pretraining heads (the pretraining model's) and the q_dense layers,
    # which the reference's own forward pass never calls
    assert set(report.skipped) == {n for n in state if n.startswith("cls.") or Q_DENSE.fullmatch(n)}
    assert all("not a parameter of ViLBERTForTasks" in report.skipped[n] for n in state if n.startswith("cls."))
    for ref, ours in NEW_HEADS.items():
        assert any(n.startswith(ours + ".") for n in report.loaded), ref
    pre, pre_report = ViLBERTForPretraining.from_pretrained(path, config=config, output_loading_info=True)
    used = set(report.loaded) | set(pre_report.loaded)
    assert pre_report.fresh == []
    # every checkpoint tensor but the q_dense layers reached one of the two models; the MLM decoder weight
    # is the word embeddings in the reference (one tensor saved twice), and so it is here
    unused = {n for n in state if (reference_to_project(n)[0] or n) not in used}
    assert unused == {n for n in state if Q_DENSE.fullmatch(n)} | {"cls.predictions.decoder.weight"}
    assert "tied to" in pre_report.skipped["cls.predictions.decoder.weight"]
    del pre

    # back under the reference names: the very values that were read, with the paper shapes
    back, unmapped = convert_project_state_dict(tasks.state_dict())
    assert unmapped == []
    expected = {n for n in state if not n.startswith("cls.") and not Q_DENSE.fullmatch(n)}
    assert set(back) == expected
    for name in expected:
        assert back[name].shape == state[name].shape and torch.equal(back[name], state[name]), name


def test_gqa_reads_its_head_into_the_answer_head_and_writes_it_back(reference_file) -> None:
    path, state = reference_file
    config = ViLBERTConfig.preset("vilbert-base", num_answers=1533)
    model, report = ViLBERTForTasks.from_pretrained(path, config=config, output_loading_info=True,
                                                     reference_answer_head="vil_prediction_gqa")  # fmt: skip
    assert model.gqa_head is None and model.config.num_gqa_answers == 0  # no second copy of the same head
    assert torch.equal(model.vqa_head.classifier.weight, state["vil_prediction_gqa.logit_fc.3.weight"])
    assert "another task" in report.skipped["vil_prediction.logit_fc.3.weight"]
    assert project_to_reference("vqa_head.classifier.bias", "vil_prediction_gqa") == "vil_prediction_gqa.logit_fc.3.bias"
    back, _ = convert_project_state_dict(model.state_dict(), answer_head="vil_prediction_gqa")
    assert torch.equal(back["vil_prediction_gqa.logit_fc.0.weight"], state["vil_prediction_gqa.logit_fc.0.weight"])
    assert "vil_prediction.logit_fc.0.weight" not in back


def test_alignment_head_goes_back_as_two_logits_with_the_same_probability() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(1, 16), torch.randn(1)
    back, unmapped = convert_project_state_dict({"align_head.weight": w, "align_head.bias": b,
                                                 "vilbert.image_embeddings.feature_mean": torch.zeros(3)})  # fmt: skip
    assert unmapped == ["vilbert.image_embeddings.feature_mean"]  # ours alone
    x = torch.randn(5, 16)
    two = x @ back["cls.bi_seq_relationship.weight"].T + back["cls.bi_seq_relationship.bias"]
    torch.testing.assert_close(two.softmax(-1)[:, 0], torch.sigmoid(x @ w.T + b)[:, 0])


def test_old_task_checkpoints_load_with_the_new_heads_fresh(tmp_path: Path) -> None:
    """A project checkpoint saved before the two-image and three-way heads existed still loads."""
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset("tiny")
    model = ViLBERTForTasks(cfg)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    old = {k: v for k, v in load_file(tmp_path / "model.safetensors").items()
           if not k.startswith(("binary_head.", "tri_head.", "token_head."))}  # fmt: skip
    save_file(old, str(tmp_path / "model.safetensors"))
    loaded, report = ViLBERTForTasks.from_pretrained(tmp_path, output_loading_info=True)
    assert {n.split(".")[0] for n in report.fresh} == {"binary_head", "tri_head", "token_head"}
    assert torch.equal(loaded.vqa_head.classifier.weight, model.vqa_head.classifier.weight)


def test_image_pair_logits_concatenate_each_images_fused_vector() -> None:
    """The two-image head reads [fused(text, image 0), fused(text, image 1)]: swapping the images changes it."""
    torch.manual_seed(0)
    cfg = ViLBERTConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)  # fmt: skip
    model = ViLBERTForTasks(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (3, 5))
    feat, loc = torch.randn(3, 2, 4, cfg.v_feature_size), torch.rand(3, 2, 4, 5)
    with torch.no_grad():
        got = model.image_pair_logits(ids, feat, loc)
        pooled = [model(ids, feat[:, i], loc[:, i]).pooled for i in (0, 1)]
        expected = model.binary_head(torch.cat(pooled, dim=-1))
        swapped = model.image_pair_logits(ids, feat.flip(1), loc.flip(1))
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, swapped)
