"""The steps both engines share: the image encoder over decoded batches (which mix clips), each
clip's rows gathered, and a clip whose last frame is through turned into its features (its
audio rows, encoded with those of the other clips finished in the same batch, and its title's
token rows added) or into the record of the error that failed it.
:mod:`.stage` runs it in this process, :mod:`.on_ray` in the actors of a Ray cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import shards
from pipeline.features.encoders.loaded import Encoders
from pipeline.features.sources import Batch, ClipJob
from pipeline.records import FAILED, OK

TEXT_BATCH = 64  # finished clips whose titles go through the text encoder in one call


def embed_batches(batches: Iterable[Batch], jobs: list[ClipJob], enc: Encoders,
                  advance: Callable[[int], None] = lambda n: None
                  ) -> Iterator[tuple[ClipJob, shards.ClipFeatures | None, str | None]]:
    """The image rows of each batch into its clips' jobs; each clip whose last frame is through
    comes out with its features (its audio rows added), or the error that failed it. With a
    title encoder, finished clips wait until ``TEXT_BATCH`` of them can have their titles
    encoded together (or the batches end)."""
    waiting: list[tuple[ClipJob, shards.ClipFeatures]] = []
    for batch in batches:
        for j, windows in batch.video:  # a clip's windows as they complete, encoded now
            job = jobs[j]
            job.video.append((enc.embed_video(windows), windows.start, windows.end))
            p, d = job.video_counts
            job.video_counts = (p + windows.padded, d + windows.dropped)
        if batch.images.shape[0]:
            y = enc.embed_images(batch.images)
            for k in range(y.shape[0]):
                job = jobs[int(batch.owners[k])]
                job.rows.append(y[k])
                job.times.append(float(batch.times[k]))
            advance(y.shape[0])
        audio = audio_rows(batch.done, enc)
        for (j, examples, error), rows in zip(batch.done, audio, strict=True):
            job = jobs[j]
            clip = None if error is not None else clip_features(job, examples, enc, rows)
            job.rows, job.times, job.video = [], [], []  # free the rows: they are in the clip
            if clip is None or enc.text is None:
                yield job, clip, error
            else:
                waiting.append((job, clip))
        if len(waiting) >= TEXT_BATCH:
            yield from with_titles(waiting, enc)
            waiting = []
    yield from with_titles(waiting, enc)


def with_titles(finished: list[tuple[ClipJob, shards.ClipFeatures]], enc: Encoders
                ) -> Iterator[tuple[ClipJob, shards.ClipFeatures, None]]:
    """Finished clips with their titles' token rows, the titles encoded in one batched call;
    a clip without a title gets zero rows and an empty string."""
    titles = [job.title for job, _ in finished if job.title]
    rows = iter(enc.embed_texts(titles))
    for job, clip in finished:
        clip.text = next(rows) if job.title else np.zeros((0, enc.text_dim), np.float32)
        clip.text_string = job.title or ""
        yield job, clip, None


def audio_rows(done: list[tuple[int, Any, str | None]], enc: Encoders
               ) -> list[np.ndarray | None]:
    """The audio rows of each clip finished in a batch (None: a failed clip), the examples of
    all of them in one call of the audio encoder rather than a call (and a sync) per clip."""
    examples = [ex[0] if err is None and ex is not None and ex[0] is not None else None
                for _, ex, err in done]
    present = [x for x in examples if x is not None and x.shape[0]]
    if len(present) < 2:  # nothing to gather: each clip as it comes
        return [None if err is not None else enc.embed_audio(x)
                for (_, _, err), x in zip(done, examples, strict=True)]
    rows = enc.embed_audio(torch.cat(present))
    out: list[np.ndarray | None] = []
    at = 0
    for (_, _, err), x in zip(done, examples, strict=True):
        n = 0 if x is None else int(x.shape[0])
        out.append(None if err is not None else rows[at:at + n])
        at += n
    return out


def clip_features(job: ClipJob, examples: Any, enc: Encoders,
                  audio: np.ndarray | None = None) -> shards.ClipFeatures:
    """A finished clip's rows, its audio rows (``audio``, else encoded here), its windows'
    rows and its record's fields, as a shard stores them."""
    ex, audio_ts = examples if examples is not None else (None, np.zeros(0))
    r = job.rec
    image = np.stack(job.rows) if job.rows else np.zeros((0, enc.image.dim), np.float32)
    clip = shards.ClipFeatures(
        job.id,
        str(r.get("source") or job.id),
        float(r.get("start") or 0.0),
        float(r.get("end") or 0.0),
        image,
        np.asarray(job.times, np.float64),
        enc.embed_audio(ex) if audio is None else audio,
        audio_ts,
        view_of=str(r.get("view_of") or ""),
    )
    if enc.video is not None:
        parts = job.video or [(np.zeros((0, enc.video_dim), np.float32), np.zeros(0),
                               np.zeros(0))]
        rows, starts, ends = zip(*parts, strict=True)
        clip.video, clip.video_start, clip.video_end = (np.concatenate(x)
                                                        for x in (rows, starts, ends))
        clip.video_padded, clip.video_dropped = job.video_counts
    return clip


def failed_record(job: ClipJob, error: str) -> dict:
    """The manifest record of a clip that failed while its frames were read."""
    return {"id": job.id, "item": job.id, "status": FAILED, "error": error,
            "source": job.rec.get("source")}


def ok_record(rec: dict, row: dict) -> dict:
    """A clip's manifest record once its shard is in place."""
    return {
        "id": rec["id"],
        "status": OK,
        "source": rec.get("source"),
        "start": rec.get("start"),
        "end": rec.get("end"),
        "shard": row["shard"],
        "row": row["row"],
        "n_frames": row["n_frames"],
        "n_audio": row["n_audio"],
        **({"n_video": row["n_video"]} if "n_video" in row else {}),
    }


def commit_shard(out: Path, rows: list[dict], members: list[ClipJob], tracker: Any,
                 errors: dict[int, str] | None = None) -> None:
    """A shard just renamed into place: its rows appended to the index, then each member's
    record (``errors``: member index -> why it failed instead)."""
    from pipeline.files import writing

    if rows:
        with writing(out / shards.INDEX):
            shards.add_to_index(out, rows)
    index = {r["clip_id"]: r for r in rows}
    errors = errors or {}
    for j, job in enumerate(members):
        rec = failed_record(job, errors[j]) if j in errors else ok_record(job.rec, index[job.id])
        tracker.record(job.item, [rec])
