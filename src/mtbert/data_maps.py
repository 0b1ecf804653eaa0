"""Data maps (Swayamdipta et al. 2020, "Dataset Cartography: Mapping and Diagnosing Datasets
with Training Dynamics"), the per-example statistics STG-MTL groups tasks by.

With `train.data_maps: true` the trainer hands every training batch's head outputs of a
classification task to `DataMaps.record`: each time training draws an example (once per
epoch), the probability the model gave its gold label in that training forward pass, as the
paper's code records it. Per example: **confidence**, the mean of those probabilities;
**variability**, their standard deviation (population, as the paper's); **correctness**, the
share of passes whose argmax was the gold label. Regression tasks have no gold-label
probability and get no map. The sums, over every rank's examples under DDP, live in the
resume checkpoints (`data_maps.safetensors`); at the end of training
`RUN_DIR/data_maps/TASK.csv` holds one row per training example drawn at least once (`row`
is its position in the run's training split).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import Tensor

from mtbert.config import TaskConfig
from mtbert.evaluation import output_probabilities

FOLDER = "data_maps"
COLUMNS = ("row", "confidence", "variability", "correctness", "passes")
STATISTICS = ("sum", "sum_squares", "correct", "passes")


class DataMaps:
    """Running per-example sums of the gold-label probability, per classification task."""

    def __init__(self, tasks: dict[str, TaskConfig], sizes: dict[str, int]):
        self.tasks = {name: task for name, task in tasks.items()
                      if task.kind == "classification"}
        self.sums = {name: {key: torch.zeros(sizes[name], dtype=torch.float64)
                            for key in STATISTICS} for name in self.tasks}

    def record(self, task: str, predictions: Tensor, labels: Tensor, rows: Tensor) -> None:
        if task not in self.sums:
            return
        with torch.no_grad():
            probabilities = output_probabilities(self.tasks[task], predictions.float()).cpu()
            gold = labels.long().cpu()
            p = probabilities.gather(1, gold[:, None])[:, 0].double()
            sums, rows = self.sums[task], rows.cpu()
            sums["sum"].index_add_(0, rows, p)
            sums["sum_squares"].index_add_(0, rows, p * p)
            sums["correct"].index_add_(0, rows, (probabilities.argmax(1) == gold).double())
            sums["passes"].index_add_(0, rows, torch.ones_like(p))

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{task}.{key}": value for task, sums in self.sums.items()
                for key, value in sums.items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        for task, sums in self.sums.items():
            for key in STATISTICS:
                sums[key].copy_(tensors[f"{task}.{key}"])

    def write(self, folder: Path) -> list[Path]:
        """`folder/TASK.csv` per task (COLUMNS); returns the files."""
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for task, sums in self.sums.items():
            passes = sums["passes"]
            seen = torch.nonzero(passes > 0)[:, 0]
            n = passes[seen]
            confidence = sums["sum"][seen] / n
            variability = (sums["sum_squares"][seen] / n - confidence ** 2).clamp(min=0).sqrt()
            correctness = sums["correct"][seen] / n
            path = folder / f"{task}.csv"
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(COLUMNS)
                writer.writerows(zip(seen.tolist(), confidence.tolist(), variability.tolist(),
                                     correctness.tolist(), n.long().tolist()))
            files.append(path)
        return files


def read_data_map(path: Path) -> dict[str, list[float]]:
    """A `TASK.csv` written by `DataMaps.write`, as columns."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {column: [float(row[column]) for row in rows] for column in COLUMNS}
