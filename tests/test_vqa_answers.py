"""Official VQA answer normalisation, soft scores and the answer vocabulary, against hand-computed values."""

from __future__ import annotations

import pytest

from pipelines.vqa_answers import (
    answer_targets,
    build_answer_vocab,
    load_answer_vocab,
    normalize_answer,
    save_answer_vocab,
    soft_score,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number word -> digit, lower-cased
        ("none", "0"),
        ("  Ten\tDogs\n", "10 dogs"),  # tabs/newlines to spaces, strip
        ("the dog.", "dog"),  # sentence period removed, article dropped
        ("An apple", "apple"),
        ("yes!", "yes"),  # '!' not next to a space: becomes a space, then split away
        ("hello , world", "hello world"),  # ' ,' present: every mark is deleted, not spaced
        ("1,000", "1000"),  # digit,digit present: all marks deleted
        ("red-white", "red white"),  # '-' with no space around: replaced by a space
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("e.g", "eg"),
        ("dont", "don't"),  # contraction fixed
        ("isnt it", "isn't it"),
        ("Im", "im"),  # lower-cased BEFORE the contraction table, so the capitalised key never matches
        ("a", ""),  # articles only -> empty answer
        ("(left)", "left"),
        ("black/white", "black white"),
        ("x" + "." * 40, "x" + "." * 8),  # re.UNICODE passed as count: only 32 periods go
    ],
)
def test_normalize_answer_matches_hand_computed(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_soft_score_values() -> None:
    assert [soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="annotator count"):
        soft_score(-1)


def test_answer_targets_counts_normalised_answers() -> None:
    answers = ["two", "2", "2", "Two", "yes", "yes", "no", "the yes", "cat", "Cat."]
    vocab = {"2": 0, "yes": 1, "cat": 2, "dog": 3}
    labels, scores = answer_targets(answers, vocab)
    # "2" x4 -> 1.0, "yes" x3 -> 0.9, "cat" x2 -> 0.6, "no" not in the vocabulary, "dog" absent.
    assert labels == [0, 1, 2]
    assert scores == [1.0, 0.9, 0.6]


def test_build_answer_vocab_counts_questions_and_orders_deterministically(tmp_path) -> None:
    anns = [
        {"question_id": 1, "multiple_choice_answer": "Two", "answers": []},
        {"question_id": 2, "multiple_choice_answer": "2", "answers": []},
        {"question_id": 3, "multiple_choice_answer": "yes", "answers": []},
        {"question_id": 4, "multiple_choice_answer": "Yes!", "answers": []},
        {"question_id": 5, "multiple_choice_answer": "cat", "answers": []},
        {
            "question_id": 5,
            "multiple_choice_answer": "cat",
            "answers": [],
        },  # same question twice: counts once
        # No multiple_choice_answer: the majority of the ten answers is used.
        {"question_id": 6, "answers": [{"answer": a} for a in ["two"] * 6 + ["three"] * 4]},
        {"question_id": 7, "multiple_choice_answer": "blue", "answers": []},
    ]
    assert build_answer_vocab(anns, min_count=2) == ["2", "yes"]  # "2": 3 questions, "yes": 2
    assert build_answer_vocab(anns, min_count=1) == ["2", "yes", "blue", "cat"]
    save_answer_vocab(["2", "yes"], tmp_path / "answers.json")
    assert load_answer_vocab(tmp_path / "answers.json") == ["2", "yes"]
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="bad.json"):
        load_answer_vocab(tmp_path / "bad.json")
