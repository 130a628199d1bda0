"""Augmented views of a clip (``extract-frames --augment SPEC --views K``).

A spec is comma-separated transforms, each ``name`` or ``name=strength``; the strength gives
the range each view's value is drawn from: one number ``s`` means the transform's symmetric
range (``rotate=10``: -10..10 degrees), ``a-b`` or ``a..b`` an explicit one (``speed=0.9-1.1``;
``gain=-6..-3``: signed ends need ``..``).
View ``k`` of clip ``c`` draws every value from its own generator, seeded by (seed, c, k), so
the same command makes the same views. A view's geometry (crop, rotation, flip) and colour are
the same on all its frames, as a camera would make them; noise is drawn per frame.

Frames: ``hflip`` (flipped with probability p, default 0.5), ``rotate`` (degrees, bilinear,
black corners, same size), ``crop`` (a box of a drawn fraction of each side, anywhere in the
frame, scaled back to the frame's size), ``jitter`` (brightness, contrast and saturation
factors in 1 +- s), ``noise`` (gaussian, its std a fraction of full scale). Time: ``speed``
(a factor f: the view plays f times as fast; its frames are the source's at f x the sampled
times, its audio time-stretched by ffmpeg's ``atempo``, pitch kept). Audio: ``gain`` (dB,
+- s) and ``anoise`` (gaussian, a fraction of full scale).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UsageError

# name -> (default strength, kind): "sym" draws in -s..s, "unit" in 1-s..1+s, "max" in 0..s,
# "prob" is a probability, "range" must be given as a-b (or one value: fixed).
TRANSFORMS: dict[str, tuple[str, str]] = {
    "hflip": ("0.5", "prob"),
    "rotate": ("10", "sym"),
    "crop": ("0.8", "crop"),
    "jitter": ("0.2", "unit"),
    "noise": ("0.02", "max"),
    "speed": ("0.9-1.1", "range"),
    "gain": ("6", "sym"),
    "anoise": ("0.005", "max"),
}
AUDIO_ONLY = frozenset({"gain", "anoise"})  # they change nothing in a view's frames
ORDER = tuple(TRANSFORMS)  # the order transforms are applied in (and recorded)
SPEED_LIMITS = (0.5, 2.0)  # atempo's range in every ffmpeg vpipe runs with (5.1 and on)
_NUM = r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
# LOW-HIGH (no signs) or LOW..HIGH (either may be negative: rotate=-15..-5)
_RANGE = re.compile(rf"^(?:({_NUM})\s*-\s*({_NUM})|(-?(?:{_NUM}))\s*\.\.\s*(-?(?:{_NUM})))$")


@dataclass(frozen=True)
class Augment:
    """A parsed spec: each transform with the range its values are drawn from."""

    ranges: tuple[tuple[str, float, float], ...]  # (name, low, high), in ORDER
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> Augment:
        got: dict[str, tuple[float, float]] = {}
        for term in (t.strip() for t in spec.split(",")):
            if not term:
                continue
            name, _, strength = term.partition("=")
            name = name.strip().lower()
            if name not in TRANSFORMS:
                raise UsageError(f"--augment: unknown transform {name!r} (known: "
                                 f"{', '.join(TRANSFORMS)})")
            if name in got:
                raise UsageError(f"--augment: {name} given twice")
            got[name] = _range(name, strength.strip() or TRANSFORMS[name][0])
        if not got:
            raise UsageError("--augment: no transform given (e.g. hflip,rotate=10,noise=0.02)")
        return cls(tuple((n, *got[n]) for n in ORDER if n in got), seed)

    def describe(self) -> str:
        """The spec written back in full (recorded in vpipe.json)."""
        return ",".join(f"{n}={_fmt(lo)}" if lo == hi else f"{n}={_fmt(lo)}..{_fmt(hi)}"
                        for n, lo, hi in self.ranges)

    @property
    def names(self) -> set[str]:
        return {n for n, _, _ in self.ranges}

    def draw(self, clip_id: str, k: int) -> dict[str, Any]:
        """View ``k``'s values (``k`` >= 1), from its own seeded generator."""
        rng = view_rng(self.seed, clip_id, k)
        out: dict[str, Any] = {}
        for name, lo, hi in self.ranges:
            if name == "hflip":
                out[name] = bool(rng.random() < lo)
            elif name == "crop":
                out[name] = {"scale": round(float(rng.uniform(lo, hi)), 6),
                             "x": round(float(rng.random()), 6),
                             "y": round(float(rng.random()), 6)}
            elif name == "jitter":
                out[name] = {k2: round(float(rng.uniform(lo, hi)), 6)
                             for k2 in ("brightness", "contrast", "saturation")}
            else:
                out[name] = round(float(rng.uniform(lo, hi)), 6)
        return out


def _range(name: str, text: str) -> tuple[float, float]:
    kind = TRANSFORMS[name][1]
    m = _RANGE.match(text)
    try:
        lo, hi = ((float(m[1] or m[3]), float(m[2] or m[4])) if m
                  else (float(text), float(text)))
    except ValueError:
        raise UsageError(f"--augment: {name}={text}: not a number or a range a-b") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise UsageError(f"--augment: {name}={text}: not a range low-high")
    if m and kind == "prob":  # one probability: a range's high end would be ignored
        raise UsageError(f"--augment: {name}={text}: a probability, one number 0..1 "
                         f"(e.g. {name}=0.5)")
    if not m:
        s = lo
        if s < 0:
            raise UsageError(f"--augment: {name}={text}: the strength must be >= 0")
        lo, hi = {"sym": (-s, s), "unit": (1 - s, 1 + s), "max": (0.0, s), "prob": (s, s),
                  "crop": (s, 1.0), "range": (s, s)}[kind]
    limits = {"prob": (0, 1), "crop": (0.1, 1), "unit": (0, 10), "max": (0, 1),
              "sym": (-180, 180) if name == "rotate" else (-60, 60), "range": SPEED_LIMITS}[kind]
    if lo < limits[0] or hi > limits[1]:  # say what was drawn from: jitter=1.5 is -0.5..2.5
        drawn = _fmt(lo) if lo == hi else f"{_fmt(lo)}..{_fmt(hi)}"
        raise UsageError(f"--augment: {name}={text}: draws {drawn}, outside "
                         f"{_fmt(limits[0])}..{_fmt(limits[1])}")
    return lo, hi


def _fmt(x: float) -> str:
    return f"{x:g}"


def view_rng(seed: int, clip_id: str, k: int) -> np.random.Generator:
    """The generator of view ``k`` of ``clip_id``: the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}\0{clip_id}\0{k}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class FrameView:
    """Applies a view's drawn values to its frames (RGB uint8 HxWx3, one size)."""

    def __init__(self, values: dict[str, Any], clip_id: str, k: int, seed: int) -> None:
        self.values = values
        self.noise_seed = (seed, clip_id, k)

    def __call__(self, rgb: np.ndarray, index: int) -> np.ndarray:
        from PIL import Image, ImageEnhance

        v = self.values
        h, w = rgb.shape[:2]
        img = Image.fromarray(rgb)
        if "crop" in v:
            c = v["crop"]
            cw, ch = max(1, round(w * c["scale"])), max(1, round(h * c["scale"]))
            x0, y0 = round((w - cw) * c["x"]), round((h - ch) * c["y"])
            img = img.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if v.get("rotate"):
            img = img.rotate(v["rotate"], resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        if v.get("hflip"):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if "jitter" in v:
            j = v["jitter"]
            img = ImageEnhance.Brightness(img).enhance(j["brightness"])
            img = ImageEnhance.Contrast(img).enhance(j["contrast"])
            img = ImageEnhance.Color(img).enhance(j["saturation"])
        out = np.asarray(img)
        if v.get("noise"):
            rng = view_rng(self.noise_seed[0], f"{self.noise_seed[1]}\0frame{index}",
                           self.noise_seed[2])
            noisy = out.astype(np.float32) + rng.normal(0, v["noise"] * 255, out.shape)
            out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        return out


def audio_view(samples: np.ndarray, values: dict[str, Any], clip_id: str, k: int,
               seed: int) -> np.ndarray:
    """Gain and noise on a view's int16 samples (its speed is done by :func:`stretch`)."""
    if not values.get("gain") and not values.get("anoise"):
        return samples
    x = samples.astype(np.float64) * 10 ** (values.get("gain", 0.0) / 20)
    if values.get("anoise"):
        rng = view_rng(seed, f"{clip_id}\0audio", k)
        x += rng.normal(0, values["anoise"] * 32768, x.shape)
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def stretch(wav_in: Path, wav_out: Path, factor: float, rate: int) -> None:
    """``wav_in`` played ``factor`` times as fast, pitch kept (ffmpeg's atempo)."""
    from pipeline.media.ffmpeg import run_ffmpeg

    run_ffmpeg(["-i", wav_in, "-filter:a", f"atempo={factor:.6f}", "-ac", "1", "-ar",
                str(rate), "-c:a", "pcm_s16le", wav_out], what=str(wav_in))
