"""Caption metrics as the COCO caption evaluation defines them: BLEU-1..4, CIDEr-D, ROUGE-L, and
METEOR through pycocoevalcap's Java scorer where a Java runtime is present.

Inputs are tokenised captions joined by spaces: ``refs`` maps an id to its reference captions,
``hyps`` the same ids to one generated caption. BLEU is the corpus-level score with the closest
reference length per caption; CIDEr-D uses document frequencies from the references given,
clipped tf-idf n-gram vectors, the Gaussian length penalty (sigma 6) on bigram counts and the
factor 10; ROUGE-L is the LCS F-measure with beta 1.2 against the best-matching reference.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np

MAIN_METRIC = "cider"  # CIDEr-D: what early stopping watches, higher is better

NAMES = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l")
_TINY, _SMALL = 1e-15, 1e-9  # the reference BLEU's guards against log(0) and division by 0


def ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of every 1- to ``n``-gram of ``words``."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def bleu(refs: dict[str, list[str]], hyps: dict[str, str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (clipped n-gram precision, brevity penalty on the closest ref length)."""
    correct, guess = np.zeros(n), np.zeros(n)
    test_len = ref_len = 0
    for i, hyp in hyps.items():
        h = hyp.split()
        rs = [r.split() for r in refs[i]]
        most: Counter = Counter()
        for r in rs:
            for g, c in ngrams(r, n).items():
                most[g] = max(most[g], c)
        for g, c in ngrams(h, n).items():
            correct[len(g) - 1] += min(c, most[g])
        for k in range(n):
            guess[k] += max(0, len(h) - k)
        test_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    out, prod = [], 1.0
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    for k in range(n):
        prod *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        score = prod ** (1.0 / (k + 1))
        if ratio < 1:
            score *= math.exp(1 - 1 / ratio)
        out.append(float(score))
    return out


def cider_d(refs: dict[str, list[str]], hyps: dict[str, str], n: int = 4,
            sigma: float = 6.0) -> float:
    """CIDEr-D over the ids of ``hyps`` (document frequencies from their references)."""
    ids = list(hyps)
    ref_counts = {i: [ngrams(r.split(), n) for r in refs[i]] for i in ids}
    df: Counter = Counter()
    for i in ids:
        df.update({g for c in ref_counts[i] for g in c})
    log_docs = math.log(float(len(ids)))

    def vec(counts: Counter) -> tuple[list[dict], np.ndarray, int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = np.zeros(n)
        for g, tf in counts.items():
            w = tf * (log_docs - math.log(max(1.0, df[g])))
            v[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
        bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)  # the reference's "length"
        return v, np.sqrt(norm), bigrams

    scores = []
    for i in ids:
        vh, nh, lh = vec(ngrams(hyps[i].split(), n))
        total = np.zeros(n)
        for rc in ref_counts[i]:
            vr, nr, lr = vec(rc)
            val = np.zeros(n)
            for k in range(n):
                val[k] = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0)
                             for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val[k] /= nh[k] * nr[k]
            total += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(float(np.mean(total)) / len(ref_counts[i]) * 10.0)
    return float(np.mean(scores)) if scores else 0.0


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(refs: dict[str, list[str]], hyps: dict[str, str], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-measure (precision and recall each the best over the references)."""
    scores = []
    for i, hyp in hyps.items():
        h = hyp.split()
        prec, rec = [], []
        for r in refs[i]:
            rw = r.split()
            m = _lcs(rw, h)
            prec.append(m / len(h) if h else 0.0)
            rec.append(m / len(rw) if rw else 0.0)
        p, r_ = max(prec), max(rec)
        scores.append((1 + beta**2) * p * r_ / (r_ + beta**2 * p) if p and r_ else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def java_present() -> bool:
    return shutil.which("java") is not None


def meteor(sets: list[tuple[dict[str, list[str]], dict[str, str]]]) -> list[float] | None:
    """METEOR 1.5 of each (refs, hyps) set, through pycocoevalcap's Java scorer, started once
    (it takes seconds to load); None where Java or the scorer is missing or fails (said)."""
    if not java_present():
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            return [float(scorer.compute_score({i: refs[i] for i in hyps},
                                               {i: [h] for i, h in hyps.items()})[0])
                    for refs, hyps in sets]
        finally:  # its Java process lives until killed
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    except Exception as e:  # noqa: BLE001  (an optional metric must not end a finished run)
        print(f"vpipe: note: meteor left out ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def caption_metrics(refs: dict[str, list[str]], hyps: dict[str, str], *,
                    with_meteor: bool = False) -> dict:
    """``bleu1``..``bleu4``, ``cider``, ``rouge_l`` (and ``meteor``) of ``hyps``."""
    if not hyps:
        return {}
    b = bleu(refs, hyps)
    out = {f"bleu{k + 1}": b[k] for k in range(4)}
    out["cider"] = cider_d(refs, hyps)
    out["rouge_l"] = rouge_l(refs, hyps)
    if with_meteor:
        m = meteor([(refs, hyps)])
        if m is not None:
            out["meteor"] = m[0]
    return out
