"""The finetune stage: a cell-type classifier from a checkpoint, with its figures."""

from pathlib import Path

from .model.distributed import init_world
from .model.train import TrainSettings, finetune


def run(inputs, outputs, settings: TrainSettings) -> dict:
    """`finetune` the checkpoint `inputs["init"]` on `inputs["data"]` into the folder
    `outputs` (checkpoint/, history.tsv, spikes_over_training.tsv, metrics.json), then draw
    confusion.png and training_curve.png there (one process of a torchrun draws them).
    Returns the test metrics."""
    from .model.train_plots import plot_confusion, plot_training_curves

    metrics = finetune(inputs["data"], outputs, settings, inputs["init"])
    if init_world().main:
        plot_confusion(metrics, Path(outputs) / "confusion.png")
        plot_training_curves(metrics["history"], Path(outputs) / "training_curve.png")
    return metrics
