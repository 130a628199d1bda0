"""Caption words: the tokeniser and the vocabulary of a captioning run.

Captions are lower-cased and split into words with punctuation split off; punctuation tokens are
then dropped, as the COCO caption evaluation's tokeniser does, so that "A man is cooking." and
"a man is cooking" are one caption to the model and to the metrics. The vocabulary holds the
training split's words seen at least ``min_count`` times, after the four special tokens.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
# A word is a run of letters/digits, with an inner apostrophe kept ("don't", "man's");
# anything else that is not space is a punctuation token of its own.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of ``text``, punctuation split off and dropped."""
    return [t for t in _TOKEN.findall(text.lower()) if t[0].isalnum()]


@dataclass
class Vocabulary:
    """Index <-> word; the first four entries are ``<pad> <bos> <eos> <unk>``."""

    words: list[str]

    def __post_init__(self) -> None:
        self._index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int) -> Vocabulary:
        """The words of tokenised ``captions`` seen at least ``min_count`` times (by count,
        then alphabetically, so a vocabulary does not depend on the CSV's line order)."""
        counts = Counter(w for c in captions for w in c)
        kept = sorted((w for w, n in counts.items() if n >= min_count),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def encode(self, words: Sequence[str], max_words: int) -> list[int]:
        """Word ids of up to ``max_words`` words followed by ``<eos>``."""
        return [self._index.get(w, UNK_ID) for w in words[:max_words]] + [EOS_ID]

    def known(self, words: Sequence[str]) -> int:
        """How many of ``words`` are in the vocabulary."""
        return sum(w in self._index for w in words)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<eos>``, specials left out."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i >= len(SPECIALS):
                out.append(self.words[i])
        return out

    def save(self, path: Path) -> None:
        from pipeline.files import atomic_write_text

        atomic_write_text(path, json.dumps({"words": self.words}, indent=0) + "\n")
