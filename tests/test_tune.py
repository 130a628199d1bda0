"""`vpipe tune`: real Optuna studies of real training runs on tiny synthetic feature sets,
through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("optuna", reason="vpipe tune needs pip install 'vpipe[tune]'")

from pipeline.cli import main  # noqa: E402
from pipeline.train.synthetic import make_feature_set  # noqa: E402

# Only lr=0.02 learns in 5 epochs; lr=1e-6 stays at the trivial predictor.
LEARNS, STUCK = 0.02, 1e-6
TINY = ["--epochs", "5", "--batch-size", "16", "--threads", "1", "--device", "cpu"]
SPACE = f"lr={STUCK},{LEARNS} hidden=8,16"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tune-set")
    csv_path, _ = make_feature_set(root / "feats", "classification", n_sources=60,
                                   clips_per_source=2, dim=8, n_shards=2, seed=4)
    return root / "feats", csv_path


def tune_args(store, out: Path, *extra: str, search: str = SPACE, trials: int = 4) -> list[str]:
    folder, csv_path = store
    return ["tune", str(folder), "--labels", str(csv_path), "-o", str(out), "--search", search,
            "--trials", str(trials), *TINY, *extra]


@pytest.fixture(scope="module")
def done(store, tmp_path_factory) -> Path:
    """One finished 4-trial search (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("tune-run") / "search"
    assert main(tune_args(store, out, "--quiet")) == 0
    return out


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_search_finds_the_one_region_that_learns(done):
    s = read(done / "summary.json")
    assert [t["trial"] for t in s["trials"]] == [0, 1, 2, 3]
    assert {t["state"] for t in s["trials"]} <= {"complete", "pruned"}
    by_lr = {lr: [t["val"] for t in s["trials"] if t["options"]["lr"] == lr]
             for lr in (STUCK, LEARNS)}
    assert by_lr[STUCK] and by_lr[LEARNS], "the seeded sampler tries both regions"
    best = s["best"]
    assert best["options"]["lr"] == LEARNS
    assert best["val"] == max(by_lr[LEARNS]) >= 0.8
    assert max(by_lr[STUCK]) <= best["val"] - 0.3
    # The best options, as train words, --set overrides and a workflow table.
    assert best["train_options"].startswith(f"--lr {LEARNS} --hidden ")
    assert f"--set train.lr={LEARNS}" in best["set"]
    assert tomllib.loads(best["workflow"])["train"] == {
        k.replace("_", "-"): v for k, v in best["options"].items()}
    for t in s["trials"]:
        assert t["seconds"] > 0 and t["epochs"] >= 1
        assert (done / t["run"] / "config.json").is_file()
    info = read(done / "vpipe.json")
    assert info["stage"] == "tune" and info["ended"] and "optuna" in info["versions"]
    assert info["params"]["search"] == f"lr={STUCK!r},{LEARNS!r} hidden=8,16"
    assert info["result"]["best_trial"] == best["trial"]


def test_only_the_best_trial_is_scored_on_test(store, done, tmp_path):
    s = read(done / "summary.json")
    best = s["best"]
    assert (done / "best").resolve() == (done / best["run"]).resolve()
    for t in s["trials"]:
        run = read(done / t["run"] / "summary.json")
        metrics = (done / t["run"] / "metrics.jsonl").read_text()
        assert "test_" not in metrics  # never per epoch
        if t["trial"] == best["trial"]:
            assert run["test"]["accuracy"] == best["test"]["accuracy"]
            assert read(done / t["run"] / "vpipe.json")["result"]["split"] == "test"
        else:
            assert run["test"] == {} and "test" not in run["baseline"]
    # OUT/best is a run that evaluate and predict take.
    folder, csv_path = store
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(done / "best"), str(folder), "--labels", str(csv_path),
                 "--split", "test", "-o", str(out)]) == 0
    assert read(out)["metrics"]["accuracy"] == pytest.approx(best["test"]["accuracy"])
    assert main(["predict", str(done / "best"), str(folder), "-o", str(tmp_path / "p.jsonl"),
                 "-q"]) == 0


def test_a_trial_worse_than_the_median_is_pruned_and_its_run_ends_cleanly(store, tmp_path):
    out = tmp_path / "out"
    assert main(tune_args(store, out, "--quiet", trials=8)) == 0
    s = read(out / "summary.json")
    pruned = [t for t in s["trials"] if t["state"] == "pruned"]
    assert pruned, [(t["options"], t["state"], t["val"]) for t in s["trials"]]
    assert all(t["trial"] >= 4 for t in pruned)  # not before 4 trials ended
    for t in pruned:
        run = read(out / t["run"] / "summary.json")
        assert 2 <= run["epochs_run"] == t["epochs"] < 5
        assert len((out / t["run"] / "metrics.jsonl").read_text().splitlines()) == t["epochs"]
        assert run["test"] == {} and read(out / t["run"] / "vpipe.json")["ended"]
    assert s["best"]["options"]["lr"] == LEARNS


def test_the_same_command_again_trains_nothing_and_scores_nothing(store, done, tmp_path):
    import shutil

    again = tmp_path / "again"
    shutil.copytree(done, again, symlinks=True)
    before = {p: p.stat().st_mtime_ns for p in again.glob("trial-*/*.pt")}
    scored = (again / "best" / "summary.json").stat().st_mtime_ns
    assert main(tune_args(store, again, "--quiet")) == 0
    assert {p: p.stat().st_mtime_ns for p in again.glob("trial-*/*.pt")} == before
    assert (again / "best" / "summary.json").stat().st_mtime_ns == scored
    assert len(read(again / "summary.json")["trials"]) == 4


@pytest.mark.parametrize("change", [["--search", "lr=0.001,0.01"], ["--epochs", "6"],
                                    ["--model", "attention"]])
def test_other_options_into_the_same_out_are_refused(store, done, change, capsys):
    args = tune_args(store, done, "--quiet")
    if change[0] == "--search":
        args[args.index("--search") + 1] = change[1]
    else:
        args[args.index("--quiet"):] = [*change, "--quiet"]
    before = sorted(p.name for p in done.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "a search with other options (" in err and "--overwrite" in err
    assert sorted(p.name for p in done.iterdir()) == before


@pytest.mark.parametrize("search, trials, says", [
    ("lr=1e-4..1e-2:lin", 4, "only :log"),
    ("lr=0..1e-2:log", 4, "must start above 0"),
    ("learning-rate=0.1,0.2", 4, "--learning-rate is not a train option"),
    ("device=cpu,cuda", 4, "--device does not change what is learned"),
    # --seed deals the sources into the splits: trials of other seeds, other val clips
    ("seed=0..5", 4, "--seed draws the split too: each trial would be scored on other val"),
    ("dropout=0..1", 4, "--dropout must be in [0, 1)"),
    ("hidden=8..16.5", 4, "'16.5' is not a whole number"),
    ("hidden", 4, "write OPTION=LOW..HIGH[:log] or OPTION=A,B,C"),
    ("lr=0.01,0.02", 0, "--trials must be at least 1"),
])
def test_bad_input_is_a_usage_error_before_anything_is_written(store, tmp_path, capsys, search,
                                                                trials, says):
    out = tmp_path / "out"
    assert main(tune_args(store, out, search=search, trials=trials)) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_a_search_whose_every_trial_fails_says_why_in_its_one_line(store, tmp_path, capsys):
    """Every trial refused the same way (the store has no titles to fine-tune on): the line
    gives a trial's reason, not only where to look for it."""
    out = tmp_path / "out"
    assert main(tune_args(store, out, "--quiet", search="finetune-text=true", trials=2)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vpipe: error: no trial of {out} finished (2 failed, e.g. trial 0: UsageError: "
        f"--finetune-text trains the title encoder: {store[0]} has no text features (make "
        f"them with `vpipe features --text FILE`); see {out / 'summary.json'})"]


def test_a_failed_trial_is_recorded_with_its_reason_and_the_study_goes_on(store, tmp_path):
    out = tmp_path / "out"
    # lr 1e30 overflows the weights in the first steps: a NaN loss.
    assert main(tune_args(store, out, "--quiet", search=f"lr={LEARNS},1e30", trials=3)) == 0
    s = read(out / "summary.json")
    failed = [t for t in s["trials"] if t["state"] == "failed"]
    assert failed and all(t["options"]["lr"] == 1e30 for t in failed)
    assert all(t["reason"].startswith("training loss nan at epoch 1") for t in failed)
    assert s["best"]["options"]["lr"] == LEARNS
    assert read(out / "vpipe.json")["counts"]["failed"] == len(failed)


def test_a_trial_killed_mid_training_is_redone_from_its_last_epoch(store, tmp_path):
    """SIGKILL a real `vpipe tune` process in its second trial, then run the same command."""
    out = tmp_path / "cut"
    args = tune_args(store, out, "--quiet", search=f"lr={LEARNS}", trials=2)
    args[args.index("--epochs") + 1] = "15"
    args[-1:-1] = ["--patience", "15"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "trial-001" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut_at = len(metrics.read_text().splitlines())
    assert 3 <= cut_at < 15, "the trial should have been killed part way"
    first = (out / "trial-000" / "best.pt").stat().st_mtime_ns
    assert main(args) == 0
    s = read(out / "summary.json")
    assert [(t["trial"], t["state"]) for t in s["trials"]] == [(0, "complete"), (1, "complete")]
    assert (out / "trial-000" / "best.pt").stat().st_mtime_ns == first  # kept as it was
    counts = read(out / "trial-001" / "vpipe.json")["counts"]
    assert counts["already_done"] == cut_at and counts["done"] == 15 - cut_at


@pytest.mark.slow
def test_parallel_jobs_run_trials_at_once(store, tmp_path):
    out = tmp_path / "par"
    assert main(tune_args(store, out, "--quiet", "--jobs", "2", trials=4)) == 0
    s = read(out / "summary.json")
    assert len(s["trials"]) == 4 and s["best"]["options"]["lr"] == LEARNS
    spans = []
    for t in s["trials"]:
        info = read(out / t["run"] / "vpipe.json")
        spans.append((info["started"], info["ended"]))
    spans.sort()
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans


def test_a_workflow_runs_a_tune_table_and_evaluates_its_best_run(store, tmp_path, monkeypatch):
    folder, csv_path = store
    (tmp_path / "wf.toml").write_text(
        f'inputs = ["{folder}"]\nlabels = "{csv_path}"\nwork_dir = "work"\n\n[tune]\n'
        f'search = "{SPACE}"\ntrials = 2\nepochs = 5\nbatch-size = 16\nthreads = 1\n'
        'device = "cpu"\n\n[evaluate]\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "wf.toml", "--quiet"]) == 0
    work = tmp_path / "work" / "tune"
    assert len(read(work / "summary.json")["trials"]) == 2
    assert (work / "best" / "evaluation.json").is_file()


def test_without_optuna_tune_says_how_to_install_it(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    assert main(tune_args(store, tmp_path / "out")) == 2
    assert "vpipe tune needs Optuna: pip install 'vpipe[tune]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_trials_run_as_ray_tasks(store, tmp_path, local_ray):
    out = tmp_path / "on-ray"
    assert main(tune_args(store, out, "--quiet", "--engine", "ray", "--jobs", "2",
                          trials=2)) == 0
    s = read(out / "summary.json")
    assert [t["state"] for t in s["trials"]] == ["complete"] * 2
    assert s["best"]["options"]["lr"] == LEARNS and s["best"]["test"]
    assert read(out / "vpipe.json")["params"]["engine"] == "ray"
    assert all((out / t["run"] / "best.pt").is_file() for t in s["trials"])


def test_with_folds_the_objective_is_the_mean_over_folds_and_only_the_best_is_tested(
        store, tmp_path):
    out = tmp_path / "folds"
    assert main(tune_args(store, out, "--quiet", "--folds", "3", trials=3)) == 0
    s = read(out / "summary.json")
    assert s["objective"].startswith("mean over 3 folds of val accuracy")
    best = s["best"]
    for t in s["trials"]:
        assert t["state"] == "complete"  # 3 trials: the pruner waits for 4
        folds = [read(out / t["run"] / f"fold-{k}" / "summary.json") for k in (1, 2, 3)]
        vals = [f["val"]["accuracy"] for f in folds]
        assert t["val"] == pytest.approx(sum(vals) / 3, abs=1e-12)
        assert t["epochs"] == sum(f["epochs_run"] for f in folds)
        tested = t["trial"] == best["trial"]
        assert (out / t["run"] / "predictions.jsonl").exists() == tested
        for k, f in enumerate(folds, 1):
            assert bool(f["test"]) == tested, (t["trial"], k)
            assert "test_" not in (out / t["run"] / f"fold-{k}" / "metrics.jsonl").read_text()
    assert best["options"]["lr"] == LEARNS and best["folds"] == 3
    # The best trial's test figure is the mean of its folds' test groups, as train --folds says.
    folds_summary = read(out / best["run"] / "summary.json")
    tests = [read(out / best["run"] / f"fold-{k}" / "summary.json")["test"]["accuracy"]
             for k in (1, 2, 3)]
    assert best["test"]["accuracy"] == pytest.approx(sum(tests) / 3, abs=1e-12)
    assert folds_summary["mean"]["test"]["accuracy"] == best["test"]["accuracy"]
    lines = (out / best["run"] / "predictions.jsonl").read_text().splitlines()
    folder, csv_path = store
    n_clips = sum(1 for _ in csv_path.open()) - 1
    clips = [json.loads(ln) for ln in lines if json.loads(ln)["level"] == "clip"]
    assert len(clips) == n_clips == len({c["id"] for c in clips})  # every clip, out of fold
    assert {c["fold"] for c in clips} == {1, 2, 3}
    assert read(out / "best" / "vpipe.json")["result"]["split"] == "test"
    assert main(["evaluate", str(out / "best" / "fold-2"), str(folder), "--labels",
                 str(csv_path), "--split", "test", "-o", str(tmp_path / "e.json")]) == 0
    # Again: nothing trained, nothing scored again.
    before = (out / best["run"] / "predictions.jsonl").stat().st_mtime_ns
    assert main(tune_args(store, out, "--quiet", "--folds", "3", trials=3)) == 0
    assert (out / best["run"] / "predictions.jsonl").stat().st_mtime_ns == before


def test_folds_options_are_checked_before_anything_is_written(store, tmp_path, capsys):
    assert main(tune_args(store, tmp_path / "out", "--folds", "1")) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_on_a_terminal_the_table_of_trials_is_drawn_live(store, tmp_path):
    """A real `vpipe tune` with its stderr on a pseudo-terminal: the table is redrawn in place
    as epochs end (the running trial's epoch counts up), one row per trial, then the line."""
    import pty

    out = tmp_path / "live"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *tune_args(store, out, trials=2)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait() == 0
    text = b"".join(chunks).decode()
    assert "\x1b[J" in text and "\x1b[1F" in text  # drawn, then redrawn in place
    for epoch in range(1, 6):  # trial 0's epochs shown as they end, not only at its end
        assert f"trial   0  running   epoch   {epoch}" in text, text[-2000:]
    final = text.rsplit("\x1b[J", 1)[1].splitlines()
    assert [ln.split()[:3] for ln in final[:2]] == [["trial", "0", "complete"],
                                                    ["trial", "1", "complete"]]
    assert final[2].startswith("vpipe tune: 2 trials (2 complete, 0 pruned, 0 failed)")


def test_with_folds_a_poor_trial_is_pruned_between_folds(store, tmp_path):
    out = tmp_path / "folds-pruned"
    assert main(tune_args(store, out, "--quiet", "--folds", "3", trials=7)) == 0
    s = read(out / "summary.json")
    pruned = [t for t in s["trials"] if t["state"] == "pruned"]
    assert pruned, [(t["options"], t["state"], t["val"]) for t in s["trials"]]
    for t in pruned:
        assert t["trial"] >= 4 and t["options"]["lr"] == STUCK
        run = read(out / t["run"] / "summary.json")
        assert run["folds_trained"] == 2 and not (out / t["run"] / "fold-3").exists()
        assert t["val"] == pytest.approx(run["mean"]["val"]["accuracy"], abs=1e-12)
