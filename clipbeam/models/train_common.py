"""The training loop that `clipbeam train clip` and `clipbeam train vqgan` share.

A `TrainTask` knows its model and how to turn a batch of records into a loss;
`run_training` owns everything else: the seeded epoch order, the learning-rate
schedule (linear warm-up, cosine decay), progress lines, the loss history
(history.csv and a loss.png plot in the output), and checkpoints that a rerun
resumes from. A checkpoint (checkpoints/last.pt) holds the weights, the
optimizer, the step, the position in the epoch and the RNG state, so an
interrupted run continues with the batches it would have seen.

Records come from any object with `epoch(epoch, seed, skip)` and `decode(record)`
(clipbeam.corpus.train_data.CorpusSamples); this module never imports Beam.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from clipbeam.errors import FieldError
from clipbeam.models.torch_files import load_weights_only
from clipbeam.storage import atomic_open, get_fs, join

LOG = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
HISTORY = "history.csv"
PLOT = "loss.png"


class RecordSource(Protocol):
    def epoch(self, epoch: int, seed: int, skip: int = 0) -> Iterator[Any]: ...

    def decode(self, record: Any) -> Any: ...


class TrainTask(Protocol):
    """One kind of training: the model, its loss on a batch, and what to write at the end."""

    name: str
    model: torch.nn.Module
    settings: dict  # what must not change between a run and its resume

    def parameter_groups(self, weight_decay: float) -> list[dict]: ...

    def step(self, images: list, captions: list[str | None]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def export(self, output: str, storage_options: dict | None) -> list[str]: ...


@dataclass
class LoopConfig:
    output: str
    total_steps: int
    batch_size: int
    lr: float
    seed: int = 0
    weight_decay: float = 0.1
    warmup_steps: int = 50
    log_every: int = 20
    save_every: int = 200
    storage_options: dict = field(default_factory=dict)


def learning_rate(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to zero at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_torch(obj: Any, url: str, storage_options: dict | None) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_open(url, "wb", storage_options) as handle:
        handle.write(buffer.getvalue())


def load_torch(url: str, storage_options: dict | None) -> Any:
    """Read a training checkpoint with `weights_only=True`.

    Output folders live in shared buckets, so `last.pt` is as untrusted as any
    downloaded file: a pickle that names a callable is refused (one line) and
    nothing in it runs. A checkpoint holds only tensors, dicts, lists, numbers
    and strings, so no extra safe globals are needed.
    """
    return load_weights_only(url, storage_options, what="training checkpoint")


def checkpoint_exists(output: str, storage_options: dict | None) -> bool:
    fs, path = get_fs(join(output, CHECKPOINT), storage_options)
    return fs.exists(path)


def read_checkpoint_settings(output: str, storage_options: dict | None) -> dict:
    """The settings recorded in an output's checkpoint (for resume checks before any work)."""
    return dict(load_torch(join(output, CHECKPOINT), storage_options).get("settings", {}))


def read_checkpoint_step(output: str, storage_options: dict | None) -> int:
    return int(load_torch(join(output, CHECKPOINT), storage_options)["step"])


def check_resume_settings(saved: dict, current: dict) -> None:
    """Raise UsageError when a resume would continue another run (other model, corpus, batch, seed...)."""
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
    if changed:
        raise FieldError("overwrite", "the output holds a checkpoint of another run (" + "; ".join(changed[:3]) +
                         "); pass {field} to start over or use another {output}", ("output",))


def _batches(source: RecordSource, batch_size: int, seed: int, epoch: int, batch: int
             ) -> Iterator[tuple[int, int, list]]:
    """(epoch, batch index, records) from the given position on; only whole batches; endless."""
    while True:
        chunk: list = []
        produced = 0
        for record in source.epoch(epoch, seed, skip=batch * batch_size):
            chunk.append(record)
            if len(chunk) == batch_size:
                yield epoch, batch, chunk
                produced += 1
                batch += 1
                chunk = []
        if produced == 0 and batch == 0:
            raise FieldError("batch_size", f"the corpus has fewer usable samples than {{field}} {batch_size}")
        epoch, batch = epoch + 1, 0


def write_history(output: str, history: Sequence[dict], storage_options: dict | None) -> None:
    """history.csv (one row per logged step) and loss.png (every numeric column against the step)."""
    if not history:
        return
    columns = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    with atomic_open(join(output, HISTORY), "wb", storage_options) as handle:
        handle.write(text.getvalue().encode("utf-8"))
    plotted = [c for c in columns if c not in ("step", "epoch", "lr", "samples_per_s", "seconds")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plotted), 1, figsize=(7, 2.2 * len(plotted)), sharex=True, squeeze=False)
    steps = [row["step"] for row in history]
    for ax, name in zip(axes[:, 0], plotted, strict=True):
        ax.plot(steps, [row.get(name, float("nan")) for row in history], lw=1.2)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if name.endswith("loss") and all(row.get(name, 1) > 0 for row in history):
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    with atomic_open(join(output, PLOT), "wb", storage_options) as handle:
        handle.write(png.getvalue())


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint saves and a resume restores."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list = field(default_factory=list)
    decode_failures: int = 0
    seconds_before: float = 0.0  # training seconds of the runs this one resumes


def _restore(task: TrainTask, optimizer, cfg: LoopConfig) -> TrainState:
    """The output's checkpoint restored into task and optimizer, or a fresh state (seeded)."""
    if not checkpoint_exists(cfg.output, cfg.storage_options):
        torch.manual_seed(cfg.seed)
        return TrainState()
    saved = load_torch(join(cfg.output, CHECKPOINT), cfg.storage_options)
    check_resume_settings(saved["settings"], task.settings)
    task.model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    state = TrainState(saved["step"], saved["epoch"], saved["batch_in_epoch"], list(saved["history"]),
                       int(saved.get("decode_failures", 0)), float(saved.get("seconds", 0.0)))
    LOG.info("resuming %s from step %d (epoch %d, batch %d)", task.name, state.step, state.epoch,
             state.batch_in_epoch)
    return state


def _save(task: TrainTask, optimizer, state: TrainState, cfg: LoopConfig, seconds: float) -> None:
    save_torch({
        "model": task.model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
        "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "history": state.history,
        "settings": task.settings, "decode_failures": state.decode_failures, "torch_rng": torch.get_rng_state(),
        "seconds": state.seconds_before + seconds,
    }, join(cfg.output, CHECKPOINT), cfg.storage_options)
    write_history(cfg.output, state.history, cfg.storage_options)


def _decode_batch(source: RecordSource, records: list, state: TrainState) -> tuple[list, list]:
    """The batch's images and captions; records that do not decode are counted and skipped."""
    images, captions = [], []
    for record in records:
        try:
            images.append(source.decode(record))
        except ValueError as exc:
            state.decode_failures += 1
            LOG.debug("skipping %s: %s", getattr(record, "id", "?"), exc)
            continue
        captions.append(getattr(record, "caption", None))
    return images, captions


def _optimise(task: TrainTask, optimizer, images: list, captions: list, lr: float, step: int) -> dict:
    """One optimiser step at learning rate `lr`; the step's metrics with its loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, metrics = task.step(images, captions)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{task.name}: loss is {loss.item()} at step {step}; lower the learning rate (lr)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return dict(metrics, loss=float(loss.detach()))


class _ProgressWindow:
    """Metrics averaged over the steps since the last progress line, logged and kept in the history."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.metrics = time.monotonic(), 0, []

    def add(self, samples: int, metrics: dict) -> None:
        self.samples += samples
        self.metrics.append(metrics)

    def report(self, task: TrainTask, state: TrainState, cfg: LoopConfig, lr: float) -> None:
        elapsed = time.monotonic() - self.start
        mean = {k: sum(m[k] for m in self.metrics) / len(self.metrics) for k in self.metrics[-1]}
        rate = self.samples / max(elapsed, 1e-9)
        state.history.append({"step": state.step, "epoch": state.epoch, "lr": lr,
                              "samples_per_s": round(rate, 1), **mean})
        eta = (cfg.total_steps - state.step) * (elapsed / len(self.metrics))
        shown = " ".join(f"{k} {v:.4g}" for k, v in mean.items())
        LOG.info("%s step %d/%d epoch %d %s lr %.2e %.0f samples/s eta %s", task.name, state.step,
                 cfg.total_steps, state.epoch, shown, lr, rate, _format_eta(eta))
        self._reset()


def run_training(task: TrainTask, source: RecordSource, cfg: LoopConfig, device: str) -> dict:
    """Train until cfg.total_steps (resuming from the output's checkpoint if there is one); returns a summary."""
    optimizer = torch.optim.AdamW(task.parameter_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    state = _restore(task, optimizer, cfg)
    if state.step >= cfg.total_steps:
        LOG.info("%s already trained for %d steps", task.name, state.step)
    task.model.to(device).train()
    start = time.monotonic()
    window = _ProgressWindow()
    batches = _batches(source, cfg.batch_size, cfg.seed, state.epoch, state.batch_in_epoch)
    while state.step < cfg.total_steps:
        state.epoch, batch_index, records = next(batches)
        images, captions = _decode_batch(source, records, state)
        state.batch_in_epoch = batch_index + 1
        if len(images) < 2:
            continue
        lr = learning_rate(state.step, cfg)
        window.add(len(images), _optimise(task, optimizer, images, captions, lr, state.step))
        state.step += 1
        if state.step % cfg.log_every == 0 or state.step == cfg.total_steps:
            window.report(task, state, cfg, lr)
        if state.step % cfg.save_every == 0 and state.step < cfg.total_steps:
            _save(task, optimizer, state, cfg, time.monotonic() - start)
    _save(task, optimizer, state, cfg, time.monotonic() - start)
    task.model.eval()
    return {
        "steps": state.step,
        "epochs_started": state.epoch + 1,
        "decode_failures": state.decode_failures,
        "seconds": round(state.seconds_before + time.monotonic() - start, 1),
        "final": state.history[-1] if state.history else {},
        "written": task.export(cfg.output, cfg.storage_options),
    }
