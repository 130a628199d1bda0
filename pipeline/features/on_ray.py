"""``vpipe features --engine ray``: decoding in CPU tasks, the models in a pool of actors.

The driver splits the clips to do into *chunks* (up to ``--shard-size`` clips and
:data:`FRAMES_PER_CHUNK` frames). A Ray task decodes a chunk into the same uint8 batches the
local loop makes (:meth:`source.batches <pipeline.features.sources.FrameFolders.batches>`, in
the task's own process); an actor, which loaded the encoders once, embeds them
(:func:`~pipeline.features.embed.embed_batches`, the local loop's code) and writes the chunk's
clips as one shard, renamed into place when complete. The driver alone appends the index and
the manifest, after each committed shard, so an interrupted run resumes as a local one does.

Actors: one per GPU (``num_gpus=1``) on a cluster with GPUs, unless ``--device cpu``; else one
per node, holding all but one of its CPUs (the one left decodes). Each actor chooses its own
device (its GPU where Ray gave it one, else the CPU) and precision; the driver loads no model:
it keeps what the actors report (:class:`ActorEncoders`: the encoders' identity, the shards'
attributes, what decoding needs), and refuses actors that disagree. Decode tasks run on the
CPUs the actors left free, as many at once as there are, the decoded chunks bounded in number
and bytes (:func:`decode_sizing`). A decode task or an actor whose process dies is retried by
Ray (a killed actor restarts and its chunk is encoded again); a chunk still failing fails its
clips with the reason, and the run goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import shards
from pipeline.engine import TASK_RETRIES, RayEngine
from pipeline.errors import UsageError
from pipeline.features.embed import commit_shard, embed_batches, failed_record
from pipeline.features.options import FeatureOptions
from pipeline.features.sources import Batch, ClipJob, Decoding
from pipeline.runner import Tracker

# A chunk's decoded frames travel through Ray's object store: at 224 px, 1024 frames are 154 MB.
FRAMES_PER_CHUNK = 1024
# Decoded chunks waiting for (or in) an actor, per actor: enough to keep it busy.
QUEUED_PER_ACTOR = 2
# The share of the cluster's object store that decoded chunks may fill at once.
STORE_SHARE = 0.5


@dataclass
class ActorEncoders:
    """What the driver keeps of the actors' encoders (no model): what decides the output, the
    shards' attributes, what decode tasks need, the loader's batch size and each actor's
    device and precision."""

    ids: dict[str, Any]
    shard_attrs: dict[str, dict]
    decoding: Decoding
    loader_batch: int
    devices: list[dict]

    def identity(self) -> dict[str, Any]:
        """What of the encoders decides the output (as :meth:`Encoders.identity`)."""
        return dict(self.ids)

    def attrs(self) -> dict[str, dict]:
        """The shard attributes of each modality (as :meth:`Encoders.attrs`)."""
        return {k: dict(v) for k, v in self.shard_attrs.items()}


def actor_kind(device: str, cluster_gpus: float) -> str:
    """``gpu`` (one actor per GPU) or ``cpu`` (one per node) for ``--device``: ``auto`` takes
    the cluster's GPUs where it has any, whatever the driver's machine has."""
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda") and not cluster_gpus:
        raise UsageError(f"--device {device}: the Ray cluster has no GPU (use auto or cpu)")
    return "gpu" if cluster_gpus else "cpu"


def actor_device(device: str, gpu_ids: list) -> str:
    """The device an actor loads its encoders on: the GPU Ray gave it (``cuda``: the one it
    sees), else the CPU, whatever the driver's ``--device`` resolves to on the driver."""
    return "cuda" if gpu_ids and device != "cpu" else "cpu"


def decode_sizing(free_cpus: float, actors: int, store_bytes: float) -> dict[str, int]:
    """How many decode tasks run at once (the cluster's CPUs the actors left free, at least
    one), how many chunks may be decoding or decoded at once (those plus
    :data:`QUEUED_PER_ACTOR` per actor), and the bytes of decoded frames they may hold at once
    (:data:`STORE_SHARE` of the object store; one chunk whatever its size)."""
    tasks = max(1, int(free_cpus))
    return {"decode_tasks": tasks, "chunks_in_flight": tasks + QUEUED_PER_ACTOR * actors,
            "bytes_in_flight": int(store_bytes * STORE_SHARE)}


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

    def __init__(self, opts: FeatureOptions, threads: int) -> None:
        import ray
        import torch

        from pipeline.features.encoders.loaded import load_encoders

        if threads > 0:
            torch.set_num_threads(threads)
        opts = dataclasses.replace(opts, device=actor_device(opts.device, ray.get_gpu_ids()))
        self.enc = load_encoders(opts)
        self.opts = opts

    def describe(self) -> ActorEncoders:
        """What the driver keeps of this actor's encoders."""
        from pipeline.device import describe_device

        enc = self.enc
        dec = dataclasses.replace(Decoding.of(enc), pin_memory=False)
        return ActorEncoders(enc.identity(), enc.attrs(), dec, enc.batching.loader_batch,
                             [{**describe_device(enc.device), "precision": enc.precision}])

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


def encode_on_ray(jobs: list[ClipJob], source: Any, actors: list[Any], enc: ActorEncoders,
                  opts: FeatureOptions, tracker: Tracker, out: Path,
                  on_shard: Callable[[Path], None] | None, engine: RayEngine, attrs: dict
                  ) -> dict[str, int]:
    """The Ray loop: decode tasks feed the ``actors``; each committed shard is indexed and its
    clips recorded by this process alone. Returns the decode work's sizing."""
    ray = engine.ray
    fps, _every = opts.sampling()
    groups = chunks(jobs, opts.shard_size, fps)
    decode = ray.remote(decode_chunk).options(num_cpus=1, max_retries=TASK_RETRIES)
    source_ref, dec = ray.put(source), enc.decoding
    # Decoded in batches of the loader's size; each actor cuts them into its own model calls.
    loader_opts = dataclasses.replace(opts, batch_size=enc.loader_batch)
    sizing = decode_sizing(ray.available_resources().get("CPU", 0), len(actors),
                           ray.cluster_resources().get("object_store_memory", 0))
    frame_bytes = 3 * dec.preprocessing.crop_size ** 2  # uint8 RGB
    size = [frame_bytes * sum(len(jobs[j].frames) or _estimated_frames(jobs[j].rec, fps)
                              for j in g) for g in groups]
    tracker.start(total=sum(len(j.frames) for j in jobs) or None)

    number = shards.next_shard_number(out)
    waiting = list(range(len(groups)))[::-1]  # chunks to decode, next one last
    decoding: dict[Any, int] = {}  # decode ref -> chunk
    encoding: dict[Any, tuple[int, int, Path]] = {}  # encode ref -> (chunk, actor, shard path)
    load = [0] * len(actors)  # chunks queued on each actor
    held = 0  # bytes of the chunks decoding, or decoded and not yet encoded

    def fail(chunk: int, why: str) -> None:
        for j in groups[chunk]:
            tracker.record(jobs[j].item, [failed_record(jobs[j], why)])

    while waiting or decoding or encoding:
        room = sizing["chunks_in_flight"] - len(decoding) - sum(load)
        while waiting and room > 0 and (held == 0 or
                                        held + size[waiting[-1]] <= sizing["bytes_in_flight"]):
            c = waiting.pop()
            decoding[decode.remote(source_ref, [jobs[j] for j in groups[c]], dec,
                                   loader_opts)] = c
            room, held = room - 1, held + size[c]
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
        load[a], held = load[a] - 1, held - size[c]
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
    return sizing  # decode tasks in flight are not cancelled: engine.py says why


def start_actors(ray: Any, opts: FeatureOptions) -> tuple[list[Any], ActorEncoders]:
    """One actor per GPU of the cluster (unless ``--device cpu``), else one per node with all
    but one of its CPUs; each loaded, on the device it chose, before any chunk is sent. Returns
    them with what they report of their encoders, which must agree."""
    actor = ray.remote(FeatureActor)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if actor_kind(opts.device, gpus) == "gpu":
        cls = actor.options(num_gpus=1, num_cpus=1, max_restarts=TASK_RETRIES,
                            max_task_retries=TASK_RETRIES)
        return _ready(ray, [cls.remote(opts, 0) for _ in range(gpus)])
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
        ).remote(opts, max(1, reserve)))
    return _ready(ray, out)


def stop_actors(ray: Any, actors: list[Any]) -> None:
    """End the actors (their models with them)."""
    for a in actors:
        ray.kill(a)


def _ready(ray: Any, actors: list[Any]) -> tuple[list[Any], ActorEncoders]:
    """The actors once each has loaded its encoders, and what they report; one clear error if
    one could not, or if two differ in what decides the output."""
    from pipeline.errors import VpipeError

    try:
        said = ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayError as e:
        stop_actors(ray, actors)
        cause = getattr(e, "cause", None) or _init_error(e)
        if isinstance(cause, VpipeError):
            raise type(cause)(f"on a Ray node: {cause}") from None
        raise VpipeError(f"a Ray actor could not load the encoders: {_first_line(e)}") from None
    first = said[0]
    for other in said[1:]:
        if other.ids != first.ids:  # other weights, or another precision, on that node
            stop_actors(ray, actors)
            diff = {k: (first.ids.get(k), other.ids.get(k))
                    for k in {*first.ids, *other.ids} if first.ids.get(k) != other.ids.get(k)}
            raise VpipeError(f"the Ray actors' encoders differ ({diff}): the same weights on "
                             "every node, and --precision to choose one") from None
    return actors, dataclasses.replace(first, devices=[d for s in said for d in s.devices])


def _stops_the_stage(e: Exception) -> bool:
    from pipeline.errors import DiskFull

    return isinstance(e, DiskFull)


def _init_error(e: BaseException) -> Exception | None:
    """The vpipe error an actor's ``__init__`` raised (``--precision fp16`` on a CPU actor),
    read from the error's text: Ray's ActorDiedError keeps only the text of its cause, a
    traceback whose last ``pipeline...Error: message`` line is the one to show."""
    import importlib
    import re

    from pipeline.errors import UsageError, VpipeError

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours the task's name
    for line in reversed(text.splitlines()):
        m = re.match(r"\s*(pipeline(?:\.\w+)*)\.(\w+): (.+)$", line)
        if m is None:
            continue
        try:
            cls = getattr(importlib.import_module(m[1]), m[2], None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, VpipeError):  # its exit code, not its
            return (UsageError if issubclass(cls, UsageError) else VpipeError)(m[3])  # args
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
