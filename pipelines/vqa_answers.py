"""VQA answers: the official normalisation, soft scores and the answer vocabulary.

`normalize_answer` reproduces the answer processing of the official VQA evaluation script
(`vqaEval.py` of the VQA challenge tools): newline/tab to space, strip, `processPunctuation`, then
`processDigitArticle`. Its quirks are kept on purpose so that accuracies match the official server:
the period regex has a typo'd lookbehind (`(?!<=\\d)`, which never fires, so every period not
followed by a digit is removed), and `re.UNICODE` is passed as the `count` argument of `re.sub`
(at most 32 periods are removed).

The answer vocabulary follows the bottom-up-attention VQA recipe used by ViLBERT: count, for each
normalised `multiple_choice_answer`, the number of distinct questions it answers; keep the answers
seen at least `min_count` (9) times. Targets are soft scores of how many of the ten annotators gave
each kept answer: 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, 4+ annotators.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official typo, kept: see module docstring
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)
DEFAULT_MIN_COUNT = 9


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: drop or space out punctuation, remove sentence periods."""
    out = text
    for p in PUNCT:
        # The test looks at the ORIGINAL text for every mark, as the official code does.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # count=32: the official call's positional slip


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words to digits, drop articles, fix contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Normalise one answer exactly as the official VQA evaluation does before comparing answers."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def soft_score(count: int) -> float:
    """VQA soft score for an answer given by `count` of the ten annotators: 0/0.3/0.6/0.9/1.0."""
    if count < 0:
        raise ValueError(f"annotator count must be >= 0, got {count}")
    return SOFT_SCORES[min(count, 4)]


def _majority_answer(answers: Sequence[str]) -> str:
    """Most frequent normalised answer; ties broken by the alphabetically first, for determinism."""
    counts = Counter(normalize_answer(a) for a in answers)
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def build_answer_vocab(annotations: Iterable[Mapping], min_count: int = DEFAULT_MIN_COUNT) -> list[str]:
    """Answer list from VQA annotations: normalised answers that answer >= `min_count` questions.

    Each annotation is a VQA v2 annotation record (`question_id`, `answers` and usually
    `multiple_choice_answer`). Order: most frequent first, then alphabetical, so the list (and every
    class id) is the same on every run.
    """
    questions_per_answer: dict[str, set[int]] = {}
    for ann in annotations:
        mc = ann.get("multiple_choice_answer")
        key = (
            normalize_answer(mc)
            if mc is not None
            else _majority_answer([a["answer"] for a in ann["answers"]])
        )
        questions_per_answer.setdefault(key, set()).add(ann["question_id"])
    kept = [(a, len(q)) for a, q in questions_per_answer.items() if len(q) >= min_count and a != ""]
    return [a for a, _ in sorted(kept, key=lambda kv: (-kv[1], kv[0]))]


def answer_targets(answers: Sequence[str], answer_to_id: Mapping[str, int]) -> tuple[list[int], list[float]]:
    """Class ids and soft scores of the in-vocabulary answers among a question's raw answers."""
    counts = Counter(normalize_answer(a) for a in answers)
    # Per question: only its few distinct answers are looked at, never the whole vocabulary.
    targets = sorted((answer_to_id[a], soft_score(n)) for a, n in counts.items() if a in answer_to_id)
    return [i for i, _ in targets], [score for _, score in targets]


def save_answer_vocab(answers: Sequence[str], path: str | Path) -> None:
    """Write the answer list as JSON (index = class id), atomically."""
    from pipelines.fileio import atomic_write_bytes

    text = json.dumps(list(answers), ensure_ascii=False, indent=0) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def load_answer_vocab(path: str | Path) -> list[str]:
    """Read an answer list written by `save_answer_vocab`; fails clearly on anything else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such answer list (the answers.json of the training TASKDIR)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON, cut short or damaged ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the answer vocabulary ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
        raise ValueError(f"{path}: answer vocabulary must be a JSON list of strings")
    return data
