"""The fixed cost of a `vpipe features` process that does little: where its seconds go before,
around and after the model's own time, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/startup.py [--frames 51] [--model resnet50]
        [--repeat 3] [--compare DIR]

Each step runs in a fresh process, so imports and the interpreter's teardown are really paid:
the interpreter alone; `import torch`, then `torch._dynamo` (which `torchvision.ops` imports)
and the rest of torchvision, with the garbage collector on and off; the teardown of a process
that imported them, with and without `gc.freeze()`; vpipe's CLI and features stage; building
the model from a weights file; its first call; the model alone on the frames (calls of the size
the stage uses, after the first); and the whole `vpipe features` command on the same frames
(random weights from a file, no audio). `--compare DIR` also times the whole command from
another checkout (e.g. `git worktree add DIR HEAD~1`), interleaved with this one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

IMPORTS = r"""
import gc, json, sys, time
if sys.argv[1] == "off":
    gc.disable()
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import torch._dynamo
t2 = time.perf_counter()
import torchvision
t3 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "torch._dynamo": t2 - t1, "torchvision": t3 - t2}))
"""

# The teardown: the parent times from the child's last line to its end.
TEARDOWN = r"""
import gc, sys, time
import torch, torchvision
if sys.argv[1] == "freeze":
    gc.freeze()
sys.stdout.write(repr(time.time()))
sys.stdout.flush()
"""

MODEL = r"""
import json, sys, time
import torch, torchvision
t0 = time.perf_counter()
import pipeline.cli
t1 = time.perf_counter()
import pipeline.features.stage
t2 = time.perf_counter()
from pipeline.features import FeatureOptions, load_encoders
opts = FeatureOptions(image_model=sys.argv[1], image_weights=sys.argv[2], audio_model="none",
                      device="cpu", batch_size=int(sys.argv[4]))
enc = load_encoders(opts)
t3 = time.perf_counter()
n = int(sys.argv[3])
enc.batching.expect(n)  # the stage's call size for a run of n frames
x = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
enc.embed_images(x[: min(n, enc.batching.size)])  # the first call
t4 = time.perf_counter()
enc.embed_images(x)
t5 = time.perf_counter()
print(json.dumps({"cli": t1 - t0, "stage": t2 - t1, "build": t3 - t2, "first": t4 - t3,
                  "model": t5 - t4, "precision": enc.precision, "size": enc.batching.size}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def wall(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, env=env)
    return time.perf_counter() - t0


def teardown(mode: str) -> float:
    p = subprocess.Popen([sys.executable, "-c", TEARDOWN, mode], stdout=subprocess.PIPE,
                         text=True)
    last = float(p.stdout.read())
    p.wait()
    return time.time() - last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=51)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="the model's call size (0: the stage's own choice)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", type=Path, metavar="DIR",
                    help="another vpipe checkout whose whole command is timed beside this one")
    a = ap.parse_args()

    import torch
    import torchvision
    from features import make_frames

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = 3
        media = make_frames(tmp / "media", clips, -(-a.frames // clips), (455, 256))
        n = clips * -(-a.frames // clips)
        model = torchvision.models.get_model(a.model)
        model.fc = torch.nn.Identity()
        weights = tmp / "w.pth"
        torch.save(model.state_dict(), weights)
        out = tmp / "out"
        args = ["features", str(media), "-o", str(out), "--image-model", a.model,
                "--image-weights", str(weights), "--audio-model", "none", "-q",
                "--batch-size", str(a.batch_size)]
        sides = {"this checkout": ROOT, **({"--compare": a.compare.resolve()} if a.compare else {})}
        rows: list[dict] = []
        for _ in range(a.repeat):
            row: dict = {"interpreter": wall([sys.executable, "-c", "pass"], ROOT)}
            for gc_mode in ("on", "off"):
                for k, v in child(IMPORTS, gc_mode).items():
                    row[f"import {k} (gc {gc_mode})"] = v
            row["teardown"] = teardown("plain")
            row["teardown (gc.freeze)"] = teardown("freeze")
            m = child(MODEL, a.model, str(weights), str(n), str(a.batch_size))
            row.update({"import vpipe cli": m["cli"], "import features stage": m["stage"],
                        "build model": m["build"], "first call": m["first"],
                        "model alone": m["model"]})
            for name, where in sides.items():
                shutil.rmtree(out, ignore_errors=True)
                env = {**os.environ, "PYTHONPATH": str(where)}
                row[f"whole process ({name})"] = wall(
                    [sys.executable, "-m", "pipeline", *args], where, env)
            info = json.loads((out / "vpipe.json").read_text())
            rows.append(row)
            print({k: round(v, 3) for k, v in row.items()}, flush=True)
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    calls = info.get("model_batch", {}).get("size")
    print(f"\n{n} frames, {a.model} ({m['precision']}, calls of {calls}), "
          f"each step in a fresh process, best of {a.repeat}:\n")
    print("| step | seconds |")
    print("|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.2f} |")
    floor = (best["interpreter"] + best["import torch (gc off)"]
             + best["import torch._dynamo (gc off)"] + best["import torchvision (gc off)"])
    print(f"\nimport floor (interpreter + torch + torchvision, gc off): {floor:.2f} s")
    for name in sides:
        whole = best[f"whole process ({name})"]
        gap = whole - best["model alone"]
        print(f"{name}: fixed cost (whole process minus the model alone) {gap:.2f} s, "
              f"of which {gap - floor:.2f} s beyond the import floor")


if __name__ == "__main__":
    main()
