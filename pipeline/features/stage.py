"""``vpipe features``: frame and audio features of every clip into HDF5 shards.

The *plan* lists the clips of the inputs through their source (:mod:`.sources`), counts those
already in complete shards as done and fails at once the clips whose files are missing. The
*loop* runs the image encoder on the source's uint8 batches (which mix clips), gathers each
clip's rows, and once a clip's last frame is through adds its VGGish rows and hands it to the
:class:`ShardSink`. A shard is renamed into place when full, then the index and the manifest
lines follow, so an interrupted run loses at most the shard in progress. A full disk stops the
run the same way, the shard in progress removed (:class:`~pipeline.errors.DiskFull`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import shards
from pipeline.device import describe_device
from pipeline.features.batching import LoaderMeter
from pipeline.features.embed import commit_shard, embed_batches, failed_record, ok_record
from pipeline.features.encoders import check_encoders
from pipeline.features.encoders.loaded import Encoders, load_encoders
from pipeline.features.options import FeatureOptions, loader_workers, recorded_options
from pipeline.features.sources import ClipJob, Decoding, source_for
from pipeline.features.text import Titles, match_titles, read_titles
from pipeline.files import check_out_dir, sha256_of, writing
from pipeline.records import MANIFEST, OK, Run
from pipeline.runner import Summary, Tracker, end_run, failure_record

STAGE = "features"
SHARD_MAX_BYTES = 1 << 30  # a shard closes at this size even below --shard-size



def feature_params(opts: FeatureOptions, enc: Encoders, source: Any,
               inputs: Sequence[Path]) -> dict:
    """Parameters that decide the output (a re-run with others is refused)."""
    text = {}
    if opts.text:  # only with --text: the parameters of runs without it stay as they were
        titles = Path(opts.text)
        text = {"text": {"file": str(titles.resolve()), "sha256": sha256_of(titles)},
                "text_max_chars": opts.text_max_chars}
    return {
        "inputs": [str(Path(p).resolve()) for p in inputs],
        **{k: v for k, v in asdict(opts).items() if k in recorded_options()},
        **enc.identity(),
        **source.params(),
        **text,
    }


def give_titles(jobs: list[ClipJob], titles: Titles, max_chars: int) -> dict[str, Any]:
    """Each job's title (its own, else its source's, cut to ``max_chars``; an augmented view's
    is its clip's); the counts of clips with and without one and the file's ids that matched no
    clip."""
    match = match_titles(titles, [(j.id, str(j.rec.get("source") or j.id)) for j in jobs],
                         max_chars, {j.id: j.rec["view_of"] for j in jobs if j.rec.get("view_of")})
    for job in jobs:
        job.title = match.by_clip.get(job.id)
    return {"titled": len(match.by_clip), "untitled": len(jobs) - len(match.by_clip),
            "unmatched": match.unmatched, "empty_titles": titles.empty}


def title_note(counts: dict[str, Any], path: str) -> str:
    """The summary's words on titles: clips without one, ids that matched no clip."""
    note = f"{counts['untitled']} clip(s) without a title (zero text rows)"
    if counts["unmatched"]:
        ids = counts["unmatched"]
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        note += f"; {len(ids)} id(s) in {path} match no clip: {shown}"
    return note


class ShardSink:
    """Finished clips, in completion order, into shards of ``shard_size`` clips (or
    SHARD_MAX_BYTES); a shard's clips are recorded once it is renamed into place."""

    def __init__(self, out: Path, enc: Encoders, opts: FeatureOptions, tracker: Tracker,
                 attrs: dict, on_shard: Callable[[Path], None] | None) -> None:
        self.out, self.enc, self.opts, self.tracker, self.attrs = out, enc, opts, tracker, attrs
        self.on_shard = on_shard
        self.number = shards.next_shard_number(out)
        self.writer: shards.ShardWriter | None = None
        self.members: list[ClipJob] = []
        self.bytes = 0

    def add(self, job: ClipJob, clip: shards.ClipFeatures) -> None:
        if self.writer is None:
            self.writer = shards.ShardWriter(
                self.out / shards.shard_name(self.number),
                image_dim=self.enc.image.dim,
                audio_dim=self.enc.audio_dim,
                text_dim=self.enc.text_dim,
                video_dim=self.enc.video_dim,
                attrs=self.attrs,
                dtype=self.opts.dtype,
                compression=None if self.opts.compression == "none" else self.opts.compression,
            )
        self.writer.add(clip)
        self.members.append(job)
        itemsize = np.dtype(self.opts.dtype).itemsize
        self.bytes += (clip.image.size + clip.audio.size + clip.text.size
                       + clip.video.size) * itemsize
        if len(self.members) >= self.opts.shard_size or self.bytes >= SHARD_MAX_BYTES:
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        w, self.writer = self.writer, None
        rows = w.close()  # a shard that cannot be finished is removed, its error raised
        commit_shard(self.out, rows, self.members, self.tracker)
        self.number += 1
        self.bytes = 0
        self.members = []
        if self.on_shard is not None:
            self.on_shard(w.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def shard_of(rec: dict) -> list[str]:
    """The file a clip's record names (its size is recorded, for ``vpipe run``'s check)."""
    return [rec["shard"]]


def loading_line(n_clips: int, opts: FeatureOptions) -> str:
    """What the stage says while its models load: the clips and each model with its weights."""
    hf = opts.image_model.startswith("hf:")  # its weights come with it
    models = [opts.image_model if hf else f"{opts.image_model} ({opts.image_weights})"]
    if opts.audio_model != "none":
        models.append(f"{opts.audio_model} ({opts.audio_weights})")
    if opts.text:
        models.append(opts.text_model)
    if opts.video_model != "none":
        models.append(f"{opts.video_model} ({opts.video_weights})")
    return f"vpipe features: {n_clips} clips; loading {', '.join(models)} ..."


def extract_features(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    opts: FeatureOptions,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    on_shard: Callable[[Path], None] | None = None,
    engine: Any = None,
) -> Summary:
    """Encode every ok clip of ``inputs`` (extract-frames folders; with ``from_video`` clips or
    videos) into shards in ``out_dir``, here or on ``engine`` (a
    :class:`~pipeline.engine.RayEngine`: :mod:`.on_ray`). ``on_shard`` is called with each
    finished shard (tests use it to interrupt a run)."""
    inputs = [Path(p) for p in inputs]
    check_encoders(opts)  # every family's usage errors before anything is said or written
    check_out_dir(out_dir, [*inputs, *([opts.text] if opts.text else [])])  # before any loading
    titles = read_titles(opts.text) if opts.text else None  # a bad file: exit 2, before work
    source = source_for(inputs, opts)
    jobs = source.clips()
    text_counts = give_titles(jobs, titles, opts.text_max_chars) if titles else None
    if not quiet:  # seconds of loading before the bar: say what
        print(loading_line(len(jobs), opts), file=sys.stderr, flush=True)
    actors: list = []
    if engine is None:
        enc = load_encoders(opts)
    else:  # the actors load the models; this process keeps what they report
        from pipeline.features.on_ray import start_actors

        engine.connect()
        actors, enc = start_actors(engine.ray, opts)
    try:
        return _write_features(jobs, source, enc, actors, inputs, Path(out_dir), opts,
                               overwrite=overwrite, quiet=quiet, on_shard=on_shard,
                               engine=engine, text_counts=text_counts)
    finally:
        if actors:
            from pipeline.features.on_ray import stop_actors

            stop_actors(engine.ray, actors)


def _write_features(jobs: list[ClipJob], source: Any, enc: Any, actors: list, inputs: list[Path],
                    out: Path, opts: FeatureOptions, *, overwrite: bool, quiet: bool,
                    on_shard: Callable[[Path], None] | None, engine: Any,
                    text_counts: dict | None) -> Summary:
    """The run in ``out``, its encoders loaded here (``enc``: :class:`Encoders`) or in the Ray
    ``actors`` (``enc``: what they reported)."""
    import h5py
    import torch

    params = feature_params(opts, enc, source, inputs)
    versions = {"torch": torch.__version__, "h5py": h5py.__version__}
    run = Run(out, STAGE, params, overwrite=overwrite, versions=versions,
              outputs=shard_of, inputs=inputs).open()
    # Only once the folder's lock is held: a second copy must not delete the first one's shards.
    # The shards are the features stage's record of what is done (a resume reads them), so
    # whatever --overwrite set aside (other parameters, a lost vpipe.json) takes them along.
    if run.reset:
        for p in shards.shard_paths(out):
            p.unlink()
    tracker = Tracker(run, quiet=quiet, unit="frame")
    # Where the models ran (this process's device; Ray's actors say theirs in "engine"): run
    # information, not a parameter, as --device may change on resume.
    if engine is None:
        run.extra["device"] = {**describe_device(enc.device), **enc.math}
    if text_counts is not None:
        run.extra["text"] = text_counts
        tracker.summary.note = title_note(text_counts, str(opts.text))

    in_shards = {r["clip_id"]: r for r in shards.rebuild_index(out)}
    for job in jobs:
        row = in_shards.get(job.id)
        if row is not None and run.previous.get(job.id, {}).get("status") != OK:
            with writing(out / MANIFEST):  # crashed before recording
                run.record_item(job.id, [ok_record(job.rec, row)])
    todo = []
    for job in tracker.pending(jobs, finished=lambda j: j.id in in_shards):
        try:
            source.prepare(job)
            todo.append(job)
        except Exception as e:
            rec = {**failure_record(job.id, e), "source": job.rec.get("source")}
            tracker.record(job.item, [rec])
    try:
        if engine is not None and todo:
            from pipeline.features.on_ray import encode_on_ray

            engine.start(out, inputs)
            run.extra["engine"] = {**engine.describe(), "actors": enc.devices}
            run.extra["engine"]["decode"] = encode_on_ray(
                todo, source, actors, enc, opts, tracker, out, on_shard, engine,
                shard_attrs(enc, source, opts))
        else:
            throughput = encode(todo, source, enc, opts, tracker, out, on_shard)
            if todo:
                layout = "channels_last" if enc.channels_last else "contiguous"
                run.extra["model_batch"] = {**enc.batching.report(), "memory_format": layout}
                run.extra["throughput"] = throughput
                if enc.audio_calls.report() is not None:
                    run.extra["audio_calls"] = enc.audio_calls.report()
                if enc.video_calls.report() is not None:  # a call that ran out of memory
                    run.extra["video_calls"] = enc.video_calls.report()
        if shards.VIDEO in enc.attrs():  # the whole store's, from its shards, whichever engine
            run.extra["video"] = shards.video_counts(shards.shard_paths(out))
    except BaseException as e:
        end_run(tracker, e, lambda: [job.id for job in jobs])
        raise
    return tracker.close([job.id for job in jobs])


def encode(jobs: list[ClipJob], source: Any, enc: Encoders, opts: FeatureOptions,
           tracker: Tracker, out: Path, on_shard: Callable[[Path], None] | None
           ) -> dict[str, Any]:
    """The loop: image rows batch by batch, audio and video rows per finished clip, shards as
    they fill. Returns what the loader delivered against what the model consumed
    (``throughput``)."""
    sink = ShardSink(out, enc, opts, tracker, shard_attrs(enc, source, opts), on_shard)
    total = sum(len(j.frames) for j in jobs)
    tracker.start(total=total or None)
    if total:  # unknown (0) with --from-video until decoded: the tuning decides
        enc.batching.expect(total)
    try:
        # The loader's batches; the encoders cut them into model calls of the size they chose.
        workers = loader_workers(enc.device.type) if opts.workers is None else opts.workers
        loader_opts = dataclasses.replace(opts, batch_size=enc.batching.loader_batch,
                                          workers=workers)
        batches = LoaderMeter(source.batches(jobs, Decoding.of(enc), loader_opts), workers)
        for job, clip, error in embed_batches(batches, jobs, enc, tracker.advance):
            if error is not None:
                tracker.record(job.item, [failed_record(job, error)])
            else:
                sink.add(job, clip)
        sink.close()
    finally:
        sink.abort()
    return batches.report(enc.batching)


def shard_attrs(enc: Encoders, source: Any, opts: FeatureOptions) -> dict:
    """The shards' attributes: the encoders', with how the source sampled the frames and where
    the titles were cut."""
    attrs = enc.attrs()
    attrs["image"] = source.image_attrs(attrs["image"])
    if "text" in attrs:
        attrs["text"] = {**attrs["text"], "max_chars": opts.text_max_chars}
    return attrs
