"""Every bad input to `shard`, `train` and `eval` through the command line: exit 2 and one line naming it.

Also: what `shard` records about VQA questions without ten answers, and help texts shown as written.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer
from safetensors import SafetensorError
from shard_fixtures import write_vocab
from train_fixtures import DIM, SRC, feature_set, vqa_files
from typer.testing import CliRunner

from cli import app
from vilbert_core import ViLBERTConfig, ViLBERTForTasks

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [(100 + n, i, q, a) for n, (i, q, a) in enumerate(
    [(i, q, a) for i in range(4) for q, a in (("what color is the car", "red"), ("is it a dog", "yes"))])]  # fmt: skip


class Evil:
    """A pickle payload that would create a marker file if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A feature set, VQA annotations and task shards, a vocabulary, malicious pickles, and other bad inputs."""
    from pipelines.shard_job import run_shard

    root = tmp_path_factory.mktemp("bad_inputs")
    feats = feature_set(root / "feats", 4)
    annotations = vqa_files(root, QUESTIONS)
    vqa = root / "vqa_train"
    run_shard(feats, "vqa", annotations, "train", vqa, shard_size=2, min_answer_count=1, progress=False)
    vocab = write_vocab(root / "vocab.txt", ["what", "color", "is", "the", "car", "it", "a", "dog"])
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": SRC.format(i), "caption": "a dog"}) + "\n" for i in range(4)))

    marker = root / "PWNED"
    torch.save({"vilbert.embeddings.word_embeddings.weight": Evil(marker)}, root / "evil.bin")
    (root / "evil_model").mkdir()
    torch.save({"weight": Evil(marker)}, root / "evil_model" / "pytorch_model.bin")
    step = root / "evil_resume" / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    torch.save({"step": Evil(marker)}, step / "trainer_state.pt")

    cfg = ViLBERTConfig.preset("tiny", vocab_size=len(vocab.read_text().split()), v_feature_size=DIM,
                               num_answers=len(json.loads((vqa / "answers.json").read_text())))  # fmt: skip
    ViLBERTForTasks(cfg).save_pretrained(root / "model")

    (root / "a_file.txt").write_text("not a folder")
    (root / "answers_truncated.json").write_text('["red", "ye')
    (root / "empty").mkdir()
    return {"root": root, "feats": feats, "q": annotations[0], "a": annotations[1], "vqa": vqa, "vocab": vocab,
            "captions": captions, "marker": marker}  # fmt: skip


def _shard(p: dict[str, Path], **over: str) -> list[str]:
    """shard argv for VQA training shards, with options replaced or added."""
    opts = {"--features": str(p["feats"]), "--task": "vqa", "--split": "train", "--out": str(p["root"] / "s_out"),
            "--min-answer-count": "1", **over}  # fmt: skip
    return ["shard", "--annotations", str(p["q"]), str(p["a"]), *[x for kv in opts.items() for x in kv], "--no-progress"]


def _train(p: dict[str, Path], *extra: str, **over: str) -> list[str]:
    """train argv: one step of a tiny VQA model, with options replaced or added."""
    opts = {"--task": "vqa", "--data": str(p["vqa"]), "--vocab": str(p["vocab"]), "--config": "tiny",
            "--batch-size": "4", "--steps": "1", "--num-workers": "0", "--out": str(p["root"] / "t_out"), **over}  # fmt: skip
    return ["train", *[x for kv in opts.items() for x in kv], "--no-progress", *extra]


def _eval(p: dict[str, Path], **over: str) -> list[str]:
    """eval argv on the VQA shards, with options replaced or added."""
    opts = {"--task": "vqa", "--model": str(p["root"] / "model"), "--data": str(p["vqa"]), "--vocab": str(p["vocab"]),
            "--answers": str(p["vqa"] / "answers.json"), "--out": str(p["root"] / "e_out"), "--num-workers": "0",
            **over}  # fmt: skip
    return ["eval", *[x for kv in opts.items() for x in kv], "--no-progress"]


def _disk_full_in_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing a task shard fails as a full disk does."""

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipelines.shard_job.TaskShardWriter.write", full)


def _disk_full_in_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving model.safetensors fails with safetensors' own error for a full disk."""

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)


def _disk_full_in_torch_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving trainer_state.pt fails as torch's zip writer does on a full disk, which then has no space left."""

    def full(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr("torch.save", full)
    monkeypatch.setattr("shutil.disk_usage", lambda _path: type("Usage", (), {"free": 0, "total": 1, "used": 1})())


# (case, argv from the inputs, words the one line must hold, what to break first)
CASES: list[tuple[str, Callable[[dict], list[str]], Callable[[dict], list[str]], Callable | None]] = [
    ("shard --answers missing", lambda p: _shard(p, **{"--answers": str(p["root"] / "nope.json")}),
     lambda p: ["--answers", "nope.json"], None),
    ("shard --answers truncated", lambda p: _shard(p, **{"--answers": str(p["root"] / "answers_truncated.json")}),
     lambda p: ["--answers", "answers_truncated.json", "JSON"], None),
    ("shard --out a file", lambda p: _shard(p, **{"--out": str(p["root"] / "a_file.txt")}),
     lambda p: ["--out", "a_file.txt", "not a folder"], None),
    ("shard disk full", lambda p: _shard(p), lambda p: ["no space left", str(p["root"] / "s_out")],
     _disk_full_in_shard),
    ("shard captions --split bogus",
     lambda p: ["shard", "--features", str(p["feats"]), "--task", "captions", "--annotations", str(p["captions"]),
                "--split", "bogus", "--out", str(p["root"] / "c_out"), "--no-progress"],
     lambda p: ["--split", "bogus"], None),
    ("train --out a file", lambda p: _train(p, **{"--out": str(p["root"] / "a_file.txt")}),
     lambda p: ["--out", "a_file.txt", "not a folder"], None),
    ("train --batch-size 0", lambda p: _train(p, **{"--batch-size": "0"}), lambda p: ["--batch-size", "0"], None),
    ("train --steps -1", lambda p: _train(p, **{"--steps": "-1"}), lambda p: ["--steps", "-1"], None),
    ("train --epochs 0", lambda p: _train(p, **{"--steps": "5", "--epochs": "0"}), lambda p: ["--epochs"], None),
    ("train --data empty folder", lambda p: _train(p, **{"--data": str(p["root"] / "empty")}),
     lambda p: ["--data", "empty folder", str(p["root"] / "empty")], None),
    ("train --data missing", lambda p: _train(p, **{"--data": str(p["root"] / "missing")}),
     lambda p: ["--data", "no such file or folder", "missing"], None),
    ("train --data a feature set", lambda p: _train(p, **{"--data": str(p["feats"])}),
     lambda p: ["--data", "feature set", "vilbert-data shard"], None),
    ("train --init-from a malicious pickle", lambda p: _train(p, **{"--init-from": str(p["root"] / "evil.bin")}),
     lambda p: ["--init-from", "evil.bin", "refused", "system"], None),
    ("train --resume a malicious trainer_state.pt",
     lambda p: _train(p, "--resume", **{"--out": str(p["root"] / "evil_resume")}),
     lambda p: ["--resume", "step-2/trainer_state.pt", "refused", "system"], None),
    ("train disk full (safetensors)", lambda p: _train(p, **{"--out": str(p["root"] / "t_full1")}),
     lambda p: ["no space left", "t_full1", "--resume"], _disk_full_in_safetensors),
    ("train disk full (trainer_state.pt)", lambda p: _train(p, **{"--out": str(p["root"] / "t_full2")}),
     lambda p: ["no space left", "t_full2", "--resume"], _disk_full_in_torch_save),
    ("eval --model with a malicious pytorch_model.bin", lambda p: _eval(p, **{"--model": str(p["root"] / "evil_model")}),
     lambda p: ["--model", "pytorch_model.bin", "refused", "system"], None),
    ("eval --out a file", lambda p: _eval(p, **{"--out": str(p["root"] / "a_file.txt")}),
     lambda p: ["--out", "a_file.txt", "not a folder"], None),
    ("eval --data missing", lambda p: _eval(p, **{"--data": str(p["root"] / "missing")}),
     lambda p: ["--data", "missing", "no such file or folder"], None),
    ("eval --answers missing", lambda p: _eval(p, **{"--answers": str(p["root"] / "nope.json")}),
     lambda p: ["nope.json", "no such answer list"], None),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "words", "breakage"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_line_and_its_exit_status(inputs, monkeypatch, case, argv, words, breakage) -> None:
    if breakage is not None:
        breakage(monkeypatch)
    res = CliRunner().invoke(app, argv(inputs))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    # a full disk is no bad input: the job could not finish, exit status 1 as in extract
    want = 1 if "disk full" in case else 2
    assert res.exit_code == want, (case, res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # typer.Exit, not an escaped error
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words(inputs):
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in res.output
    assert not inputs["marker"].exists(), "a malicious pickle ran"


def test_disk_full_leaves_no_half_written_checkpoint(inputs, monkeypatch) -> None:
    _disk_full_in_torch_save(monkeypatch)
    out = inputs["root"] / "t_full3"
    res = CliRunner().invoke(app, _train(inputs, **{"--out": str(out)}))
    assert res.exit_code == 1
    assert not [p.name for p in (out / "checkpoints").iterdir()]  # no step-1, no .step-1.tmp-PID


def test_vqa_questions_without_ten_answers_are_warned_about_and_recorded(inputs, tmp_path) -> None:
    files = vqa_files(tmp_path, QUESTIONS[:3], answers_per_question=3) + [inputs["q"]]
    # the second questions file repeats the question ids: only the annotations file matters here
    args = ["shard", "--features", str(inputs["feats"]), "--task", "vqa", "--annotations", str(files[0]),
            str(files[1]), "--split", "train", "--out", str(tmp_path / "odd"), "--min-answer-count", "1", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "WARNING: 3 question(s) have other than the 10 answers" in res.stderr
    assert "question_id 100 with 3" in res.stderr
    info = json.loads((tmp_path / "odd" / "task.json").read_text())
    assert info["counts"]["questions_without_10_answers"] == 3 and len(info["warnings"]) == 1
    listed = [json.loads(line) for line in (tmp_path / "odd" / "report" / "answer_counts.jsonl").read_text().splitlines()]
    assert listed == [{"question_id": q, "answers": 3} for q, *_ in QUESTIONS[:3]]
    # the same questions with their ten answers: nothing to say
    clean = json.loads((inputs["vqa"] / "task.json").read_text())
    assert clean["counts"]["questions_without_10_answers"] == 0 and clean["warnings"] == []


def _help(argv: list[str]) -> str:
    """--help output on a terminal wide enough that no line wraps."""
    res = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "1000"})
    assert res.exit_code == 0, res.output
    return res.output


def test_train_help_keeps_the_bracketed_defaults() -> None:
    text = _help(["train"])
    assert "Peak learning rate [task default: paper]." in text
    assert "Epochs [task default: paper]; ignored with --steps." in text
    assert "over all processes and accumulation [task default]." in text
    assert "[default: standardize for a new model; a checkpoint keeps its own]" in text


def test_every_option_help_is_shown_as_written() -> None:
    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        shown = " ".join(_help([name]).split())
        for param in sub.params:
            if param.help and not getattr(param, "hidden", False):  # hidden aliases are not shown
                written = " ".join(param.help.replace("\\[", "[").split())
                assert written in shown, (name, param.name, written)


def test_inspect_names_its_feature_folder_argument() -> None:
    text = _help(["inspect"])
    assert "FEATURES" in text and "{out}" not in text


def test_exit_status_says_bad_input_or_job_not_finished() -> None:
    import typer

    from cli import _fail
    from pipelines.fileio import DiskFullError
    from vilbert_core.training.args import TrainingDiverged, TrainingError

    for err, status in ((ValueError("--out x: exists"), 2), (TrainingError("--lr must be above 0"), 2),
                        (DiskFullError("no space left"), 1), (TrainingDiverged("the loss became nan"), 1)):  # fmt: skip
        with pytest.raises(typer.Exit) as exit_:
            _fail(err)
        assert exit_.value.exit_code == status, err
