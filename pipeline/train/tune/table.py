"""The live table of ``vpipe tune``'s trials on a terminal (redrawn in place as epochs and
trials end); elsewhere one line per trial as it ends; nothing with ``--quiet``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.train.tune.space import Dimension, cli_words
from pipeline.train.tune.summary import trial_rows


class Table:
    def __init__(self, dims: list[Dimension], metric: str, quiet: bool) -> None:
        self.dims, self.metric, self.quiet = dims, metric, quiet
        self.live = not quiet and sys.stderr.isatty()
        self.drawn = 0  # lines of the last drawing (the terminal's cursor is below them)
        self.said: set[int] = set()  # trials whose end was said (not a terminal)
        self.epochs: dict[int, tuple[int, float | None]] = {}  # this process's trials
        self.study = None

    def epoch_hook(self, number: int) -> Callable[[dict], None] | None:
        """For a trial run in this process: its epochs shown as they end."""
        if not self.live:
            return None

        def hook(rec: dict) -> None:
            self.epochs[number] = (rec["epoch"], rec.get("val", {}).get(self.metric))
            if self.study is not None:
                self.show(self.study)

        return hook

    def show(self, study) -> None:
        self.study = study
        if self.quiet:
            return
        rows = trial_rows(study, self.dims)
        if self.live:
            self._draw(rows)
            return
        for r in rows:
            if r["state"] in ("complete", "pruned", "failed") and r["trial"] not in self.said:
                self.said.add(r["trial"])
                print("vpipe tune: " + "  ".join(self._cells(r)).rstrip(), file=sys.stderr)

    def close(self, study) -> None:
        self.show(study)

    def _cells(self, r: dict) -> list[str]:
        epoch, val = r["epochs"], r["val"]
        if r["state"] == "running" and r["trial"] in self.epochs:
            epoch, val = self.epochs[r["trial"]]
        shown = "" if val is None else f"{val:.4f}"
        short = {k: float(f"{v:.4g}") if isinstance(v, float) else v
                 for k, v in r["options"].items()}
        what = r["reason"] if r["state"] == "failed" and r["reason"] else " ".join(
            cli_words(short))
        return [f"trial {r['trial']:>3}", f"{r['state']:<8}", f"epoch {epoch or 0:>3}",
                f"val {self.metric} {shown:<6}", what]

    def _draw(self, rows: list[dict]) -> None:
        lines = ["  ".join(self._cells(r)) for r in rows]
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        sys.stderr.write(up + "\x1b[J" + "".join(line[:200] + "\n" for line in lines))
        sys.stderr.flush()
        self.drawn = len(lines)
