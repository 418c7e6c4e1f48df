"""scripts/bench_input_tuning.py: the cost accounting of input tuning against linear_probe and seq_ft."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import REPO_ROOT

spec = importlib.util.spec_from_file_location(
    "bench_input_tuning", REPO_ROOT / "scripts" / "bench_input_tuning.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

#: 10 fake classes at 16 px, 4 images each, 2 tasks: task 0 has 5 classes; ResNet-20 embeds in 64-d.
FAKE = [
    "dataset=fake",
    "dataset.image_size=16",
    "transform.input_size=16",
    "dataset.train_per_class=4",
    "scenario.n_tasks=2",
]


@pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")
def test_input_tuning_trains_a_few_parameters_but_back_propagates_through_the_backbone() -> None:
    tuning = bench.measure([*FAKE, *bench.VARIANTS["input_tuning/additive"]], steps=1, warmup=0)
    probe = bench.measure([*FAKE, *bench.VARIANTS["linear_probe"]], steps=1, warmup=0)
    head = 64 * 5 + 5
    assert tuning["trainable_params"] == 3 * 16 * 16 + head and probe["trainable_params"] == head
    assert tuning["grads_mb"] * 2**20 == 4 * tuning["trainable_params"]
    assert tuning["optimizer_mb"] == tuning["grads_mb"]  # one SGD momentum buffer per trainable parameter
    assert tuning["activations_mb"] > 100 * probe["activations_mb"] > 0
    assert probe["train_set_mb"] * 2**20 == 20 * (64 * 4 + 8)  # 20 cached 64-d float features + labels
