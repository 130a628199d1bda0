"""``vpipe features --engine ray``: decoding in CPU tasks, the models in a pool of actors.

The driver splits the clips to do into *chunks* (up to ``--shard-size`` clips and
:data:`FRAMES_PER_CHUNK` frames). A Ray task decodes a chunk into the same uint8 batches the
local loop makes (:meth:`source.batches <pipeline.features.sources.FrameFolders.batches>`, in
the task's own process); an actor, which loaded the encoders once, embeds them
(:func:`~pipeline.features.embed.embed_batches`, the local loop's code) and writes the chunk's
clips as one shard, renamed into place when complete. The driver alone appends the index and
the manifest, after each committed shard, so an interrupted run resumes as a local one does.

Actors: one per GPU (``num_gpus=1``) on a cluster with GPUs; else one per node, holding all
but one of its CPUs (the one left decodes). A decode task or an actor whose process dies is
retried by Ray (a killed actor restarts and its chunk is encoded again); a chunk still failing
fails its clips with the reason, and the run goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import shards
from pipeline.engine import TASK_RETRIES, RayEngine
from pipeline.features.embed import commit_shard, embed_batches, failed_record
from pipeline.features.encoders.loaded import Encoders
from pipeline.features.options import FeatureOptions
from pipeline.features.sources import Batch, ClipJob, Decoding
from pipeline.runner import Tracker

# A chunk's decoded frames travel through Ray's object store: at 224 px, 1024 frames are 154 MB.
FRAMES_PER_CHUNK = 1024
# Decoded chunks waiting for an actor, per actor: enough to keep it busy, few enough to bound
# the object store's use.
QUEUED_PER_ACTOR = 2


def chunks(jobs: list[ClipJob], shard_size: int, fps: float | None,
           frames_per_chunk: int = FRAMES_PER_CHUNK) -> list[list[int]]:
    """Job indexes in order, cut into chunks of at most ``shard_size`` clips and about
    ``frames_per_chunk`` frames (a clip's frame count known from its files, else estimated
    from its duration at ``fps``, 25 frames a second when sampling every Nth frame)."""
    out: list[list[int]] = [[]]
    frames = 0
    for j, job in enumerate(jobs):
        n = len(job.frames) or _estimated_frames(job.rec, fps)
        if out[-1] and (len(out[-1]) >= shard_size or frames + n > frames_per_chunk):
            out.append([])
            frames = 0
        out[-1].append(j)
        frames += n
    return [c for c in out if c]


def _estimated_frames(rec: dict, fps: float | None) -> int:
    start, end = rec.get("start") or 0.0, rec.get("end") or 0.0
    return max(1, round((end - start) * (fps or 25.0)))


def decode_chunk(source: Any, jobs: list[ClipJob], dec: Decoding, opts: FeatureOptions
                 ) -> list[Batch]:
    """A Ray task: the chunk's frames as uint8 batches, decoded in this process."""
    import torch

    torch.set_num_threads(1)
    return list(source.batches(jobs, dec, dataclasses.replace(opts, workers=0)))


class FeatureActor:
    """A Ray actor: the run's encoders, loaded once; embeds decoded chunks into shards."""

    def __init__(self, opts: FeatureOptions, identity: dict, threads: int) -> None:
        import torch

        from pipeline.features.encoders.loaded import load_encoders

        if threads > 0:
            torch.set_num_threads(threads)
        self.enc = load_encoders(opts)
        if self.enc.identity() != identity:  # other weights on this node than the driver's
            raise RuntimeError(f"the encoders on this node differ from the driver's: "
                               f"{self.enc.identity()} != {identity}")
        self.opts = opts

    def ready(self) -> bool:
        return True

    def encode(self, path: str, jobs: list[ClipJob], batches: list[Batch], attrs: dict
               ) -> tuple[list[dict], list[tuple[int, str]], int]:
        """Embed a chunk and write its clips as the shard ``path``: the shard's index rows,
        the (job index, error) of clips that failed, and the frames embedded."""
        failed: list[tuple[int, str]] = []
        clips = []
        index = {id(job): j for j, job in enumerate(jobs)}
        frames = 0

        def count(n: int) -> None:
            nonlocal frames
            frames += n

        for job, clip, error in embed_batches(batches, jobs, self.enc, count):
            if error is not None:
                failed.append((index[id(job)], error))
            else:
                clips.append(clip)
        if not clips:
            return [], failed, frames
        opts = self.opts
        writer = shards.ShardWriter(
            Path(path), image_dim=self.enc.image.dim, audio_dim=self.enc.audio_dim,
            text_dim=self.enc.text_dim, video_dim=self.enc.video_dim, attrs=attrs,
            dtype=opts.dtype, compression=None if opts.compression == "none" else opts.compression,
        )
        try:
            for clip in clips:
                writer.add(clip)
            return writer.close(), failed, frames
        except BaseException:
            writer.abort()
            raise


def encode_on_ray(jobs: list[ClipJob], source: Any, enc: Encoders, opts: FeatureOptions,
                  tracker: Tracker, out: Path, on_shard: Callable[[Path], None] | None,
                  engine: RayEngine, attrs: dict) -> None:
    """The Ray loop: decode tasks feed the actors; each committed shard is indexed and its
    clips recorded by this process alone."""
    ray = engine.ray
    fps, _every = opts.sampling()
    groups = chunks(jobs, opts.shard_size, fps)
    actors = start_actors(ray, opts, enc)
    decode = ray.remote(decode_chunk).options(num_cpus=1, max_retries=TASK_RETRIES)
    source_ref, dec = ray.put(source), Decoding.of(enc)
    dec = dataclasses.replace(dec, pin_memory=False)
    # Decoded in batches of the loader's size; each actor cuts them into its own model calls.
    loader_opts = dataclasses.replace(opts, batch_size=enc.batching.loader_batch)
    tracker.start(total=sum(len(j.frames) for j in jobs) or None)

    number = shards.next_shard_number(out)
    waiting = list(range(len(groups)))[::-1]  # chunks to decode, next one last
    decoding: dict[Any, int] = {}  # decode ref -> chunk
    encoding: dict[Any, tuple[int, int, Path]] = {}  # encode ref -> (chunk, actor, shard path)
    load = [0] * len(actors)  # chunks queued on each actor

    def fail(chunk: int, why: str) -> None:
        for j in groups[chunk]:
            tracker.record(jobs[j].item, [failed_record(jobs[j], why)])

    try:
        while waiting or decoding or encoding:
            room = QUEUED_PER_ACTOR * len(actors) - len(decoding) - sum(load)
            while waiting and room > 0:
                c = waiting.pop()
                decoding[decode.remote(source_ref, [jobs[j] for j in groups[c]], dec,
                                       loader_opts)] = c
                room -= 1
            ready, _ = ray.wait([*decoding, *encoding], num_returns=1)
            ref = ready[0]
            if ref in decoding:
                c = decoding.pop(ref)
                a = min(range(len(actors)), key=load.__getitem__)
                path = out / shards.shard_name(number)
                number += 1
                call = actors[a].encode.remote(str(path), [jobs[j] for j in groups[c]], ref,
                                               attrs)
                encoding[call] = (c, a, path)
                load[a] += 1
                continue
            c, a, path = encoding.pop(ref)
            load[a] -= 1
            try:
                rows, failed, frames = ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError,
                    ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, Exception) and _stops_the_stage(cause):
                    raise cause from None
                fail(c, f"its Ray task failed ({type(e).__name__}: {_first_line(e)})")
                continue
            commit_shard(out, rows, [jobs[j] for j in groups[c]], tracker, dict(failed))
            tracker.advance(frames)
            if rows and on_shard is not None:
                on_shard(path)
    finally:  # decode tasks in flight are not cancelled: engine.py says why
        for actor in actors:
            ray.kill(actor)


def start_actors(ray: Any, opts: FeatureOptions, enc: Encoders) -> list[Any]:
    """One actor per GPU when this process's encoders are on a GPU, else one per node with all
    but one of its CPUs; each loaded and checked before any chunk is sent."""
    actor = ray.remote(FeatureActor)
    identity = enc.identity()
    # The device and precision this process resolved, not "auto" again on each node.
    opts = dataclasses.replace(opts, device=enc.device.type, precision=enc.precision)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if enc.device.type == "cuda" and gpus:
        cls = actor.options(num_gpus=1, num_cpus=1, max_restarts=TASK_RETRIES,
                            max_task_retries=TASK_RETRIES)
        return _ready(ray, [cls.remote(opts, identity, 0) for _ in range(gpus)])
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = []
    for node in ray.nodes():
        cpus = int(node.get("Resources", {}).get("CPU", 0)) if node.get("Alive") else 0
        if cpus < 1:
            continue
        reserve = cpus - 1 if cpus > 1 else 0  # a one-CPU node shares its CPU with decoding
        out.append(actor.options(
            num_cpus=reserve, max_restarts=TASK_RETRIES, max_task_retries=TASK_RETRIES,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=True),
        ).remote(opts, identity, max(1, reserve)))
    return _ready(ray, out)


def _ready(ray: Any, actors: list[Any]) -> list[Any]:
    """The actors once each has loaded its encoders; one clear error if one could not."""
    from pipeline.errors import VpipeError

    try:
        ray.get([a.ready.remote() for a in actors])
    except ray.exceptions.RayError as e:
        for a in actors:
            ray.kill(a)
        cause = getattr(e, "cause", None)
        if isinstance(cause, VpipeError):
            raise type(cause)(f"on a Ray node: {cause}") from None
        raise VpipeError(f"a Ray actor could not load the encoders: {_first_line(e)}") from None
    return actors


def _stops_the_stage(e: Exception) -> bool:
    from pipeline.errors import DiskFull

    return isinstance(e, DiskFull)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
