"""``vpipe export-model``: a run's trained model as one ONNX file that runs without vpipe.

The graph takes, per modality the run uses (``image``, ``audio``, ``text``, in the run's
order), the zero-padded rows ``m`` (float32, ``(B, T_m, D_m)``) and their valid steps
``m_lengths`` (int64, ``(B,)``: the mask is ``step < length``; 0 for a clip without rows
there), with the batch and every ``T_m`` free. Inside it: the uniform sampling down to the
run's ``max_frames`` (as ``predict`` reads the sequences), the feature standardisation with the
training frames' statistics, the model, and the task's value layer (``tasks.Task.value_layer``:
the regression value back in the labels' units, class or tag probabilities); so it gives per
clip what ``vpipe predict`` writes per clip. What the run is (task, classes, modalities and
their feature identities, threshold, the run and its checkpoint) is in its ``metadata_props``.

``pack_padded_sequence`` does not export: vpipe's LSTMs run here over the padded sequence
(``PaddedLSTM``), the backward direction over each clip's steps reversed within its length,
which gives the packed run's outputs and final states.

The exporter is ``torch.onnx.export``'s TorchScript one (``dynamo=False``): it needs only
``onnx`` (the ``onnx`` extra, with ``onnxruntime`` for the check), maps ``nn.LSTM`` to ONNX's
LSTM op, and takes a second of CPU. torch 2.14's default (torch.export, with onnxscript) was
tried and dropped: its LSTM decomposition fixed the sequence length to the traced one on every
export after the first in a process, and it took 20 s where this takes 2. A trace records one
path through Python, so every file is checked with onnxruntime against the run's own model
(``vpipe predict``'s computation) on a ragged batch of other sizes than the traced one
before it is written, and refused in one line if it differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import __version__
from pipeline.errors import UsageError
from pipeline.files import atomic_path, sha256_of
from pipeline.records import DamagedRecord, now_iso, read_run_info
from pipeline.shards import TEXT
from pipeline.train.config import CHECKPOINTS, DEFAULT_CHECKPOINT, ModelSpec
from pipeline.train.model import SequenceModel, valid_steps
from pipeline.train.predict import check_output
from pipeline.train.runs import load_run
from pipeline.train.sequences import pad_batch, sample_uniform
from pipeline.train.tasks import get_task

NEEDS = ("onnx", "onnxruntime")  # the `onnx` extra
OPSET = 17
TOLERANCE = 1e-4  # the check batch: exported values within this of the run's (abs + rel)


def check_extra() -> None:
    """Refuse in one line when the ``onnx`` extra is not installed."""
    for name in NEEDS:
        try:
            import_module(name)
        except ImportError:
            raise UsageError(f"vpipe export-model needs {name}, which is not installed: "
                             "pip install 'vpipe[onnx]'") from None


# --------------------------------------------------------------------------- the graph


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each clip's first ``length`` steps of ``x`` (B, T, H) in reverse order, the padding
    left where it is (its own inverse)."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :]
    n = lengths[:, None]
    idx = torch.where(steps < n, n - 1 - steps, steps)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))


def step_at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for each clip of ``x`` (B, T, H)."""
    return x.gather(1, idx[:, None, None].expand(-1, 1, x.shape[2]))[:, 0]


class PaddedLSTM(nn.Module):
    """A trained batch-first ``nn.LSTM`` run over padded sequences without packing: each layer
    and direction is a one-layer LSTM with its weights; the backward one reads each clip's
    valid steps reversed, so the padding after them never reaches a valid output."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.bidirectional = lstm.bidirectional
        suffixes = ("", "_reverse") if lstm.bidirectional else ("",)
        self.cells = nn.ModuleList()
        for layer in range(lstm.num_layers):
            for suffix in suffixes:
                width = lstm.input_size if layer == 0 else lstm.hidden_size * len(suffixes)
                one = nn.LSTM(width, lstm.hidden_size, batch_first=True)
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(one, f"{name}_l0").data.copy_(
                        getattr(lstm, f"{name}_l{layer}{suffix}").data)
                self.cells.append(one)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs (B, T, H·dirs), final states (B, H·dirs): forward at each clip's last
        valid step, backward at its first); ``lengths`` at least 1."""
        dirs = 2 if self.bidirectional else 1
        for k in range(0, len(self.cells), dirs):
            out, _ = self.cells[k](x)
            if self.bidirectional:
                back, _ = self.cells[k + 1](reverse_within(x, lengths))
                out = torch.cat([out, reverse_within(back, lengths)], dim=2)
            x = out
        hidden = self.cells[0].hidden_size
        last = step_at(x[..., :hidden], lengths - 1)
        if self.bidirectional:
            last = torch.cat([last, x[:, 0, hidden:]], dim=1)
        return x, last


class ExportableSequenceModel(nn.Module):
    """A trained :class:`SequenceModel` with the same outputs through export-friendly steps:
    its branches' own normalisation and pooling around a :class:`PaddedLSTM`, the title's
    TextCNN over rows padded by a fixed width."""

    def __init__(self, model: SequenceModel) -> None:
        super().__init__()
        self.model = model
        self.lstms = nn.ModuleDict({m: PaddedLSTM(b.lstm) for m, b in model.branches.items()
                                    if m != TEXT})

    def forward(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        model = self.model
        text = self.title(*inputs[TEXT]) if TEXT in model.branches else None
        guide = text if model.text_guided else None
        pooled = [text if m == TEXT else self.branch(m, *inputs[m], guide)
                  for m in model.modalities]
        return model.head(torch.cat(pooled, dim=1))

    def branch(self, m: str, x: torch.Tensor, lengths: torch.Tensor,
               guide: torch.Tensor | None) -> torch.Tensor:
        b = self.model.branches[m]
        mask = valid_steps(x, lengths)
        has = (lengths > 0).to(x.dtype)[:, None]
        out, last = self.lstms[m](b.normalise(x, mask), lengths.clamp(min=1))
        return b.pool_steps(out, last, mask, has, guide)

    def title(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        t = self.model.branches[TEXT]
        x = (x - t.mean) / t.std * valid_steps(x, lengths)[..., None]
        pad = max(t.cnn.windows) - 1  # a one-token title still reaches every window
        return t.cnn.pool_windows(nn.functional.pad(x, (0, 0, 0, pad)), lengths)


def uniform_steps(x: torch.Tensor, lengths: torch.Tensor, max_frames: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequences.sample_uniform`` on a padded batch: each clip longer than ``max_frames``
    down to that many evenly spread steps (in integers: floor((k + 1/2) n / M) exactly)."""
    k = torch.arange(max_frames, device=x.device)[None, :]
    n = lengths[:, None]
    spread = torch.div((2 * k + 1) * n, 2 * max_frames, rounding_mode="floor")
    kept = n.clamp(max=max_frames)
    idx = torch.where(n > max_frames, spread, k)
    idx = torch.where(k < kept, idx, torch.zeros_like(idx))  # past a clip's end: padding
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[2])), kept[:, 0]


class InferenceGraph(nn.Module):
    """What the ONNX file computes: flat inputs (``m``, ``m_lengths`` per modality) → the
    run's sampling → its model → the task's value layer."""

    def __init__(self, model: nn.Module, modalities: list[str], max_frames: int,
                 values: nn.Module) -> None:
        super().__init__()
        self.model, self.modalities, self.max_frames = model, list(modalities), max_frames
        self.values = values

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = {}
        for i, m in enumerate(self.modalities):
            x, n = tensors[2 * i], tensors[2 * i + 1]
            if m != TEXT and self.max_frames > 0:  # a title's tokens are never sampled
                x, n = uniform_steps(x, n, self.max_frames)
            inputs[m] = (x, n)
        return self.values(self.model(inputs).float())


def input_names(modalities: list[str]) -> list[str]:
    return [name for m in modalities for name in (m, f"{m}_lengths")]


# --------------------------------------------------------------------------- batches


def ragged_clips(dims: dict[str, int], lengths: list[int], seed: int,
                 stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict]:
    """Clips of random rows, clip ``i`` with ``lengths[i] - j`` rows in the ``j``-th modality
    (so the modalities' lengths differ, and some clips have none in one); drawn around the
    training frames' ``stats`` (mean, std) where given, so the model sees rows of its scale."""
    rng = np.random.default_rng(seed)
    stats = stats or {}
    clips = []
    for n in lengths:
        clip = {}
        for j, (m, d) in enumerate(dims.items()):
            mean, std = stats.get(m, (0.0, 1.0))
            clip[m] = (mean + std * rng.standard_normal((max(0, n - j), d))).astype(np.float32)
        clips.append(clip)
    return clips


def training_stats(model: nn.Module, modalities: list[str]) -> dict[str, tuple]:
    """Each modality's training mean and std as the model keeps them (vpipe's models and a
    user's class behind ``OwnModel`` alike; none found: standard normal rows)."""
    buffers = dict(model.named_buffers())
    out = {}
    for m in modalities:
        for mean, std in ((f"branches.{m}.mean", f"branches.{m}.std"), (f"mean_{m}", f"std_{m}")):
            if mean in buffers and std in buffers:
                out[m] = (buffers[mean].numpy(), buffers[std].numpy())
    return out


def flat_inputs(clips: list[dict], modalities: list[str]) -> list[torch.Tensor]:
    """The graph's inputs for ``clips`` (padded, unsampled)."""
    batch = pad_batch(clips, modalities)
    return [t for m in modalities for t in batch[m]]


def run_values(model: nn.Module, spec: ModelSpec, clips: list[dict]) -> np.ndarray:
    """What ``vpipe predict`` computes for ``clips``: sampled as ``ClipSequences`` does, padded,
    through the run's own model and its task's values."""
    sampled = [{m: a if m == TEXT else a[sample_uniform(a.shape[0], spec.config.max_frames)]
                for m, a in c.items()} for c in clips]
    with torch.no_grad():
        out = model(pad_batch(sampled, spec.modalities))
    return get_task(spec.task).values(spec, out)


# --------------------------------------------------------------------------- the file


def metadata(run: Path, checkpoint: str, spec: ModelSpec, exporter: str) -> dict[str, str]:
    """The ``metadata_props``: what the run is and how the file was made (JSON values)."""
    try:
        info = read_run_info(run) or {}
    except DamagedRecord:
        info = {}
    params = info.get("params", {})
    modalities = [{"name": m, "dim": d, "input": m, "lengths": f"{m}_lengths",
                   "features": spec.feature_attrs.get(m, {})}
                  for m, d in spec.dims.items()]
    task = get_task(spec.task)
    identity = {
        "path": str(run.resolve()),
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_of(run / f"{checkpoint}.pt"),
        "started": info.get("started"),
        "features_fingerprint": params.get("features_fingerprint"),
        "labels_sha256": params.get("labels_sha256"),
    }
    return {
        "vpipe.task": spec.task,
        "vpipe.classes": json.dumps(spec.classes),
        "vpipe.modalities": json.dumps(modalities),
        "vpipe.output": task.value_name,
        "vpipe.threshold": json.dumps(spec.config.threshold),
        "vpipe.max_frames": json.dumps(spec.config.max_frames),
        "vpipe.model": spec.config.model,
        "vpipe.version": __version__,
        "vpipe.trained_with": spec.vpipe_version,
        "vpipe.run": json.dumps(identity),
        "vpipe.exported": json.dumps({"at": now_iso(), "exporter": exporter,
                                      "command": sys.argv, "cwd": os.getcwd()}),
    }


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Descriptors 1 and 2 to nowhere: the TorchScript exporter's C++ prints warnings, and the
    whole graph when it fails, past Python's streams (its failure is said in one line)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def export_graph(graph: InferenceGraph, spec: ModelSpec, output: str, path: Path) -> str:
    """Write the ONNX graph of ``graph`` to ``path``, batch and every sequence length free;
    returns the exporter's description."""
    mods = spec.modalities
    sample = flat_inputs(ragged_clips(spec.dims, [5, 3, 0], seed=0), mods)
    axes = {}
    for m in mods:
        axes[m], axes[f"{m}_lengths"] = {0: "batch", 1: f"{m}_steps"}, {0: "batch"}
    axes[output] = {0: "batch"}
    # Its warnings (its deprecation; the LSTM's batch size, which the check batch covers).
    with warnings.catch_warnings(), silenced():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, tuple(sample), str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names(mods), output_names=[output],
                          dynamic_axes=axes)
    return f"torch.onnx.export (TorchScript) of torch {torch.__version__}, opset {OPSET}"


def check_against_run(proto_bytes: bytes, model: nn.Module, spec: ModelSpec) -> float:
    """The largest difference between the exported values and the run's own on a ragged
    check batch (other sizes than the traced one, empty and long clips); refused past
    :data:`TOLERANCE`."""
    import onnxruntime

    lengths = [9, 1, 0, 4, 13, 2, 7]
    clips = ragged_clips(spec.dims, lengths, seed=1, stats=training_stats(model,
                                                                          spec.modalities))
    want = run_values(model, spec, clips)
    feed = dict(zip(input_names(spec.modalities),
                    (t.numpy() for t in flat_inputs(clips, spec.modalities)), strict=True))
    try:
        session = onnxruntime.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
        got = session.run(None, feed)[0]
    except Exception as e:  # e.g. a traced size that other batches do not have
        raise UsageError("onnxruntime cannot run the exported model on a check batch of other "
                         f"sizes than the traced one ({root_cause(e)}); nothing written") from None
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    if got.shape != want.shape or not np.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE):
        raise UsageError(f"the exported model's values differ from the run's by up to {diff:.3g} "
                         "on a check batch; nothing written")
    return diff


def root_cause(e: BaseException) -> str:
    """The first exception of a chain (the exporter wraps it in pages of advice), in one line."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def export_model(run: str | Path, out: str | Path, *,
                 checkpoint: str = DEFAULT_CHECKPOINT) -> dict:
    """Write ``RUN``'s model (its ``checkpoint``) to ``out`` as ONNX; returns what was done."""
    if checkpoint not in CHECKPOINTS:
        raise UsageError(f"--checkpoint {checkpoint!r}: use best or last")
    check_extra()
    import onnx

    run, out = Path(run), check_output(out)
    if out.is_file() and out.suffix.lower() != ".onnx":  # -o labels.csv: replaced, unasked
        raise UsageError(f"-o {out}: an existing file that is not an .onnx model; give the "
                         "model a name of its own (e.g. model.onnx)")
    model, spec = load_run(run, checkpoint)
    if getattr(spec.config, "finetune_text", False):
        raise UsageError(f"{run}: a --finetune-text run holds a transformers title encoder that "
                         "takes token ids; export-model takes runs on stored title features "
                         "(train without --finetune-text to export)")
    task = get_task(spec.task)
    try:
        values = task.value_layer(spec)
    except UsageError as e:
        raise UsageError(f"{run}: {e}") from None
    model.eval()
    inner = ExportableSequenceModel(model) if isinstance(model, SequenceModel) else model
    graph = InferenceGraph(inner, spec.modalities, spec.config.max_frames, values).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        try:
            exporter = export_graph(graph, spec, task.value_name, tmp)
        except Exception as e:  # a user's model the exporter cannot trace
            raise UsageError(f"{run}: the model ({spec.config.model}) cannot be exported to "
                             f"ONNX: torch.onnx.export failed ({root_cause(e)})") from None
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, metadata(run, checkpoint, spec, exporter))
        proto.doc_string = (f"vpipe {spec.task} model of {run.resolve()}: per clip, the values "
                            "vpipe predict writes (vpipe.* metadata)")
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
        try:
            diff = check_against_run(data, model, spec)
        except UsageError as e:
            raise UsageError(f"{run}: {e}") from None
        tmp.write_bytes(data)
    return {"out": str(out), "task": spec.task, "inputs": input_names(spec.modalities),
            "output": task.value_name, "check_max_diff": diff, "bytes": len(data)}
