"""WordPiece tokenisation (uncased BERT style) with `tokenizers`, and vocabulary training.

`TextTokenizer.from_pretrained(path)` takes a BERT `vocab.txt` or a Hugging Face tokenizer folder
(`tokenizer.json`, else `vocab.txt`). Texts are encoded as `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`
(segment ids 0 for the first part, 1 for the second), truncated to `max_len` tokens, longest part first.
`train_wordpiece` builds a vocabulary from caption files for machines without a BERT vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.processors import TemplateProcessing

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_TEXT_LEN = 36  # tokens per text, [CLS] and [SEP] included (the paper's setting)


class TextTokenizer:
    """An uncased WordPiece tokenizer producing ids and segment ids with [CLS]/[SEP] and truncation."""

    def __init__(self, tokenizer: Tokenizer, max_len: int = MAX_TEXT_LEN) -> None:
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 to hold [CLS] x [SEP], got {max_len}")
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks special token(s) {', '.join(missing)}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        # Set the BERT template explicitly: a trained or hand-made tokenizer.json may lack it.
        self.tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        self.tokenizer.enable_truncation(max_length=max_len, strategy="longest_first")
        self.tokenizer.no_padding()
        self.pad_id = vocab["[PAD]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.mask_id = vocab["[MASK]"]
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_pretrained(cls, path: str | Path, max_len: int = MAX_TEXT_LEN) -> TextTokenizer:
        """Load from a `vocab.txt` file or a folder holding `tokenizer.json` or `vocab.txt`."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").exists():
                return cls(Tokenizer.from_file(str(path / "tokenizer.json")), max_len)
            path = path / "vocab.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no vocab.txt or tokenizer.json found")
        try:
            wp = BertWordPieceTokenizer(str(path), lowercase=True, strip_accents=True, clean_text=True)
        except (TypeError, ValueError, OSError) as err:
            # tokenizers raises TypeError("sep_token not found ...") for a vocabulary without BERT's specials
            raise ValueError(f"{path}: not a usable WordPiece vocab.txt ({err})") from err
        return cls(wp._tokenizer, max_len)

    def encode(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids and segment ids of one text (or text pair), with [CLS]/[SEP], truncated to max_len."""
        enc = self.tokenizer.encode(text, pair)
        return enc.ids, enc.type_ids

    def encode_batch(self, texts: Sequence[str | tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """`encode` for several texts or pairs at once (one Rust call)."""
        return [(e.ids, e.type_ids) for e in self.tokenizer.encode_batch(list(texts))]


def iter_texts(files: Sequence[str | Path]) -> Iterator[str]:
    """Caption/question texts from .txt (a line each), .tsv, .jsonl, COCO captions, Karpathy or VQA json."""
    from pipelines.annotations import AnnotationError
    from pipelines.annotations.captions import read_caption_jsonl, read_caption_tsv, read_coco_captions

    for f in files:
        path = Path(f)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            with open(path, encoding="utf-8") as fh:
                yield from (line.strip() for line in fh if line.strip())
        elif suffix == ".tsv":
            yield from (a.record["caption"] for a in read_caption_tsv(path))
        elif suffix == ".jsonl":
            yield from (a.record["caption"] for a in read_caption_jsonl(path))
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "questions" in data:
                yield from (q["question"] for q in data["questions"])
            elif isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
                yield from (s["raw"] for img in data["images"] for s in img["sentences"])
            else:
                yield from (a.record["caption"] for a in read_coco_captions(path))
        else:
            raise AnnotationError(
                f"{path}: cannot read texts from {suffix!r} (use .txt, .tsv, .jsonl or .json)"
            )


def train_wordpiece(
    files: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 30522, min_frequency: int = 2
) -> Path:
    """Train an uncased WordPiece vocabulary on caption files; writes `vocab.txt` + `tokenizer.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    wp.train_from_iterator(
        iter_texts(files),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    wp.save_model(str(out))
    wp.save(str(out / "tokenizer.json"))
    return out / "vocab.txt"
