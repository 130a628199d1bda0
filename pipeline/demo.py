"""The demo (``make demo``): synthetic trailers, then ``vpipe run workflows/demo.toml`` on them.

It writes two dozen small videos with ffmpeg's lavfi sources (each with its own colour, motion
and tone) and a ratings CSV whose rating is a known function of those three, runs the demo
workflow (subclip -> extract-frames -> features -> train -> predict), and prints where each
output went and the model's test metrics. Pretrained weights are used when they are cached or
can be downloaded; otherwise the demo says so and runs with seeded random weights.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.files import atomic_path
from pipeline.media import ffmpeg_exe, run_ffmpeg

SPEEDS_PX_S = (0, 30, 90)  # the white square's speed: still, slow, fast
TONES_HZ = (220, 440, 880)
VGGISH_URLS = (
    "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
    "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
    "vggish_pca_params-970ea276.pth",
)


@dataclass(frozen=True)
class Trailer:
    """One synthetic trailer and the rating it gets from its content."""

    source_id: str
    rgb: tuple[int, int, int]
    brightness: float  # 0..1
    speed: int  # index into SPEEDS_PX_S
    tone: int  # index into TONES_HZ

    @property
    def rating(self) -> float:
        # Brighter, faster and higher-pitched trailers rate higher (1.0 .. 9.5).
        return round(1.0 + 5.0 * self.brightness + 1.25 * self.speed + 0.5 * self.tone, 3)


def plan_trailers(n: int) -> list[Trailer]:
    """``n`` trailers spread over brightness, hue, motion and tone (deterministic)."""
    out = []
    for i in range(n):
        brightness = i / max(n - 1, 1)
        hue = (i * 0.381966) % 1.0  # golden-ratio steps: neighbours get distant hues
        r, g, b = colorsys.hsv_to_rgb(hue, 0.7, 0.2 + 0.75 * brightness)
        rgb = (round(r * 255), round(g * 255), round(b * 255))
        out.append(Trailer(f"trailer-{i + 1:02d}", rgb, brightness, (i * 7) % 3, (i * 5 + 1) % 3))
    return out


def make_trailer(path: Path, t: Trailer, *, duration_s: float, size: tuple[int, int]) -> None:
    """Write one trailer: a coloured background, a moving white square, a steady tone."""
    w, h = size
    v = SPEEDS_PX_S[t.speed]
    colour = "0x{:02x}{:02x}{:02x}".format(*t.rgb)
    graph = (
        f"color=c={colour}:s={w}x{h}:r=25:d={duration_s}[bg];"
        f"color=c=white:s={h // 5}x{h // 5}:r=25:d={duration_s}[sq];"
        f"[bg][sq]overlay=x='mod({v}*t,{w})':y='{h // 2}+{h // 4}*sin({v}*t/40)'"
        ":shortest=1[v];"
        f"sine=f={TONES_HZ[t.tone]}:r=44100:d={duration_s},volume=0.5[a]"
    )
    # A keyframe every 2 s, as in real trailers (keyframe-mode cuts need some).
    codecs = "-c:v libx264 -preset ultrafast -g 50 -pix_fmt yuv420p -c:a aac".split()
    with atomic_path(path) as tmp:  # a trailer appears only when complete
        run_ffmpeg(["-filter_complex", graph, "-map", "[v]", "-map", "[a]", *codecs,
                    "-t", str(duration_s), "-f", "mp4", tmp], what=str(path))


def make_dataset(
    folder: Path, n: int, *, duration_s: float = 10.0, size: tuple[int, int] = (160, 120)
) -> tuple[Path, Path]:
    """Trailers in ``folder/trailers`` and their ratings in ``folder/labels.csv`` (kept if made)."""
    videos = folder / "trailers"
    videos.mkdir(parents=True, exist_ok=True)
    trailers = plan_trailers(n)
    wanted = {f"{t.source_id}.mp4" for t in trailers}
    for old in videos.glob("trailer-*.mp4"):  # left by a demo run with more trailers
        if old.name not in wanted:
            old.unlink()
    for t in trailers:
        path = videos / f"{t.source_id}.mp4"
        if not path.exists():
            make_trailer(path, t, duration_s=duration_s, size=size)
    labels = folder / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        writer.writerows([t.source_id, t.rating] for t in trailers)
    return videos, labels


def _fetch(url: str) -> bool:
    """Is this published checkpoint in torch's hub cache (downloading it if we can)?"""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # a firewall that drops packets must not hang the demo
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
        os.replace(tmp, path)
        return True
    except Exception:
        return False
    finally:
        socket.setdefaulttimeout(old)
        tmp.unlink(missing_ok=True)


def weight_overrides(image_model: str = "resnet18") -> tuple[list[str], list[str]]:
    """``--set`` options that swap unavailable pretrained weights for random ones, and notes."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(image_model)
    sets, notes = [], []
    if not _fetch(enum.IMAGENET1K_V1.url):
        sets.append("features.image-weights=none")
        notes.append(f"{image_model} ImageNet weights ({os.path.basename(enum.IMAGENET1K_V1.url)})")
    if not all(_fetch(u) for u in VGGISH_URLS):
        sets += ["features.audio-weights=none", "features.audio-postprocess=false"]
        notes.append("VGGish weights (" + ", ".join(os.path.basename(u) for u in VGGISH_URLS) + ")")
    return sets, notes


def default_workflow() -> Path:
    """workflows/demo.toml of the current folder, else of the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "workflows" / "demo.toml").is_file():
            return root / "workflows" / "demo.toml"
    raise SystemExit("vpipe demo: workflows/demo.toml not found (run from the repository root)")


def report_test_sources(out: Path, labels: Path) -> list[str]:
    """One line per test trailer: its rating and the model's (mean over its subclips)."""
    try:
        splits = json.loads((out / "train" / "splits.json").read_text(encoding="utf-8"))
        preds = (out / "train" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    with labels.open(newline="", encoding="utf-8") as f:
        rating = {r["id"]: float(r["label"]) for r in csv.DictReader(f)}
    test_sources = {cid.rsplit("_", 1)[0] for cid in splits.get("test", [])}
    lines = []
    for rec in map(json.loads, preds):
        if rec.get("level") == "source" and rec["id"] in test_sources:
            lines.append(
                f"  {rec['id']}: rating {rating.get(rec['id'], float('nan')):.2f}, "
                f"predicted {rec['prediction']:.2f}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Make the data, run the demo workflow, print where things went and the metrics."""
    args = parse_args(argv)
    from pipeline.cli import main as vpipe

    t0 = time.time()
    out = args.out
    workflow = args.workflow or default_workflow()
    print(f"vpipe demo: making {args.trailers} synthetic trailers in {out}/trailers ...")
    videos, labels = make_dataset(out, args.trailers, duration_s=args.duration)
    sets, notes = weight_overrides()
    for note in notes:
        print(
            f"vpipe demo: offline: {note} are not cached and cannot be downloaded; this demo "
            "uses seeded RANDOM weights instead (recorded in the shards' attributes). Real "
            "features need the real weights: see README 'Weights offline'."
        )
    run_args = [
        "run",
        str(workflow),
        "--input",
        str(videos),
        "--labels",
        str(labels),
        "--work-dir",
        str(out),
        "--overwrite",  # the demo's folders are its own: a newer vpipe may have new defaults
    ]
    for s in [*sets, *args.sets]:
        run_args += ["--set", s]
    if args.quiet:
        run_args.append("--quiet")
    print("vpipe demo: " + shlex.join(["vpipe", *run_args]), flush=True)
    code = vpipe(run_args)
    print()
    print(f"vpipe demo: finished with exit {code} in {time.time() - t0:.0f}s. Where things went:")
    report(out, videos, labels, args.trailers, random_weights=bool(notes))
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's options, checked before a minute of media work."""
    summary = __doc__.split("\n")[0].replace("``", "")  # plain text in --help
    ap = argparse.ArgumentParser(prog="python -m pipeline.demo", description=summary)
    ap.add_argument("--out", type=Path, default=Path("demo-work"), help="demo folder")
    ap.add_argument("--trailers", type=int, default=24, help="number of synthetic trailers")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per trailer")
    ap.add_argument("--workflow", type=Path, default=None, help="default: workflows/demo.toml")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="STAGE.OPTION=VALUE",
        help="passed on to vpipe run",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress output from the stages")
    args = ap.parse_args(argv)
    # Refused here, not after a minute of media work: train splits by trailer (train/val/test).
    if args.trailers < 3:
        ap.error("--trailers: at least 3 (one trailer each for train, val and test)")
    if not args.duration > 0:
        ap.error("--duration: seconds per trailer, above 0")
    try:
        ffmpeg_exe()  # a VPIPE_FFMPEG that does not work: one line now, not a traceback later
    except UsageError as e:
        ap.error(str(e))
    return args


def report(out: Path, videos: Path, labels: Path, n_trailers: int, *,
           random_weights: bool) -> None:
    """Where each stage's output went, and the test metrics."""
    rows = [
        (videos, f"{n_trailers} synthetic trailers; ratings in {labels}"),
        (out / "subclip", "subclips as ranges of the trailers (manifest.jsonl, no video)"),
        (out / "extract-frames", "<clip_id>/frames/*.jpg and audio.wav per subclip"),
        (out / "features", "HDF5 shards (ResNet + VGGish features) + index.jsonl"),
        (out / "train", "model (best.pt), metrics.jsonl, summary.json, curves.png"),
        (out / "train" / "predictions.jsonl", "predicted rating per subclip and per trailer"),
    ]
    for path, what in rows:
        if path.exists():
            name = f"{path}/" if path.is_dir() else str(path)
            print(f"  {name:<34} {what}")
    summary_path = out / "train" / "summary.json"
    if summary_path.is_file():
        test = json.loads(summary_path.read_text(encoding="utf-8")).get("test", {})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in test.items() if isinstance(v, float))
        print(f"vpipe demo: test metrics (trailers the model never saw): {shown}")
        print("\n".join(report_test_sources(out, labels)))
    if random_weights:
        print(
            "vpipe demo: (features from random weights: enough for these synthetic trailers, "
            "meaningless for real videos)"
        )


if __name__ == "__main__":
    sys.exit(main())
