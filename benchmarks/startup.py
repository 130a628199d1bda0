"""The fixed cost of a `vpipe features` process that does little: where its seconds go before
and around the model's own time, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/startup.py [--frames 51] [--model resnet50]

Prints, each in a fresh process (so imports are really paid): the time to import torch and
torchvision, vpipe's CLI and its features stage; to build the model from a weights file; the
model alone on the frames (at the size the stage uses, after one warm-up call); and the whole
`vpipe features` command on the same frames (random weights from a file, no audio). The gap
between the last two is the stage's fixed cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, torchvision
t1 = time.perf_counter()
import pipeline.cli
t2 = time.perf_counter()
import pipeline.features.stage
t3 = time.perf_counter()
from pipeline.features import FeatureOptions, load_encoders
opts = FeatureOptions(image_model=sys.argv[1], image_weights=sys.argv[2], audio_model="none",
                      device="cpu", batch_size=int(sys.argv[4]))
enc = load_encoders(opts)
t4 = time.perf_counter()
n = int(sys.argv[3])
x = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
enc.embed_images(x[: min(n, 8)])  # warm-up
t5 = time.perf_counter()
enc.embed_images(x)
t6 = time.perf_counter()
print(json.dumps({"import torch+torchvision": t1 - t0, "import vpipe cli": t2 - t1,
                  "import features stage": t3 - t2, "build model (file)": t4 - t3,
                  "model warm-up call": t5 - t4, "model alone": t6 - t5}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=51)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=8, help="the model alone's call size")
    ap.add_argument("--repeat", type=int, default=2)
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
        torch.save(model.state_dict(), tmp / "w.pth")
        rows: list[dict] = []
        for r in range(a.repeat):
            probe = subprocess.run([sys.executable, "-c", PROBE, a.model, str(tmp / "w.pth"),
                                    str(n), str(a.batch_size)], check=True,
                                   stdout=subprocess.PIPE, text=True)
            parts = json.loads(probe.stdout.strip().splitlines()[-1])
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline", "features", str(media), "-o",
                            str(tmp / f"out{r}"), "--image-model", a.model, "--image-weights",
                            str(tmp / "w.pth"), "--audio-model", "none", "-q"], check=True)
            parts["vpipe features (whole process)"] = time.perf_counter() - t0
            info = json.loads((tmp / f"out{r}" / "vpipe.json").read_text())
            parts["model calls"] = info.get("model_batch", {}).get("size")
            rows.append(parts)
            print(parts, flush=True)
    best = {k: min(r[k] for r in rows) if k != "model calls" else rows[-1][k] for k in rows[0]}
    print(f"\n{n} frames, {a.model}, best of {a.repeat}:\n")
    print("| step | seconds |")
    print("|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    gap = best["vpipe features (whole process)"] - best["model alone"]
    print(f"\nfixed cost (whole process minus the model alone): {gap:.2f} s")


if __name__ == "__main__":
    main()
