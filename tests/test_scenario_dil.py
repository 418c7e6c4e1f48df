"""scenario=dil: one task per domain holding every class; per-image domain ids in the data and the per-task
views filtered by them; every domain evaluated after each task and no task-incremental matrix; the metrics
over all domains' test images; heads that never grow after the first domain; the errors for a dataset
without domains, unknown domains, class splits under DIL and methods that cannot learn it; and tiny on-disk
DomainNet runs of seq_ft, SimpleCIL and SAFE (slow lane)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, TinyBackbone, compose_config, task_context, write_domainnet
from tiny_vit_tasks import RUN_OVERRIDES
from torch.utils.data import TensorDataset

from cl_bench import debug, metrics
from cl_bench.compatibility import UnsupportedScenarioError, dil_methods
from cl_bench.config import ScenarioConfig, ScenarioType, validate_config
from cl_bench.data.arrays import ArrayImages
from cl_bench.data.base import ClassificationData
from cl_bench.errors import ConfigError, DataError
from cl_bench.evaluation import EvaluationRows, Evaluator
from cl_bench.experiment import build_experiment, task_datasets
from cl_bench.methods.seq_ft import SequentialFineTuning
from cl_bench.modules.heads import PrototypeHead
from cl_bench.results import build_results
from cl_bench.runner import RunState
from cl_bench.scenario import Task, build_scenario

DOMAINS = ["a", "b", "c"]


def dil(domains: list[str] | None = None, class_order: list[int] | None = None, n_tasks: int | None = None):
    return ScenarioConfig(
        type=ScenarioType.dil, n_tasks=n_tasks, order_seed=None, class_order=class_order, domains=domains
    )


def toy_data(per_pair: int = 2) -> ClassificationData:
    """3 domains x 4 classes; pixel value = 100 * domain + 10 * class + k identifies every image."""
    splits, ids = [], []
    for n in (per_pair, 1):
        domain, label, k = np.meshgrid(np.arange(3), np.arange(4), np.arange(n), indexing="ij")
        domain, label, k = domain.ravel(), label.ravel(), k.ravel()
        order = np.random.RandomState(n).permutation(len(label))  # images of all domains interleaved
        domain, label, k = domain[order], label[order], k[order]
        values = (100 * domain + 10 * label + k).astype(np.uint8)
        splits.append(ArrayImages(np.broadcast_to(values[:, None, None, None], (len(label), 2, 2, 3)), label))
        ids.append(domain)
    return ClassificationData("toy", splits[0], splits[1], [f"c{i}" for i in range(4)], True, DOMAINS, *ids)


def test_each_domain_is_a_task_of_every_class(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cl_bench.scenario"):
        scenario = build_scenario(dil(["c", "a"], n_tasks=5), 4, DOMAINS)
    assert "n_tasks=5 ignored" in caplog.text
    assert scenario.domain_incremental and not scenario.task_incremental
    assert [t.domain for t in scenario.tasks] == ["c", "a"]
    assert all((t.start, t.stop, t.original_classes) == (0, 4, (0, 1, 2, 3)) for t in scenario.tasks)
    first, second = scenario.tasks
    assert (first.known_classes, first.new_classes) == (0, 4)
    assert (second.known_classes, second.new_classes) == (4, 0)  # the head never grows after the first
    assert [t.domain for t in build_scenario(dil(), 4, DOMAINS).tasks] == DOMAINS  # the dataset's order
    cil_task = Task(1, 3, 6, (3, 4, 5))
    assert (cil_task.known_classes, cil_task.new_classes) == (3, 3)


def test_dil_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="scenario=dil needs per-image domain ids.*domain_names"):
        build_scenario(dil(), 4, None, "digits")
    with pytest.raises(ConfigError, match=r"scenario.domains=\['a', 'x'\].*unknown: \['x'\]"):
        build_scenario(dil(["a", "x"]), 4, DOMAINS)
    with pytest.raises(ConfigError, match="distinct"):
        build_scenario(dil(["a", "a"]), 4, DOMAINS)
    with pytest.raises(ConfigError, match="scenario.init_classes and scenario.increment must be null"):
        validate_config(compose_config("scenario=dil", "scenario.init_classes=2"))
    with pytest.raises(ConfigError, match="scenario.domains is for scenario=dil.*dataset.domains"):
        validate_config(compose_config("scenario.domains=[real]"))


def test_a_dataset_without_domains_is_refused_before_training() -> None:
    cfg = compose_config(*TINY, "scenario=dil")
    with pytest.raises(ConfigError, match="dataset digits has none.*train_domains/test_domains"):
        build_experiment(cfg)


def test_domain_ids_are_checked() -> None:
    data = toy_data()
    with pytest.raises(DataError, match="together"):
        ClassificationData("x", data.train, data.test, data.class_names, domain_names=DOMAINS)
    with pytest.raises(DataError, match="train_domains must hold one integer domain id per image"):
        ClassificationData(
            "x", data.train, data.test, data.class_names, True, DOMAINS, np.zeros(3), np.zeros(12)
        )
    with pytest.raises(DataError, match="test_domains span"):
        ClassificationData(
            "x", data.train, data.test, data.class_names, True, DOMAINS, data.train_domains, np.full(12, 3)
        )


def test_task_views_hold_their_domain_and_the_ordered_classes() -> None:
    data = toy_data()
    scenario = build_scenario(dil(["b", "a"], class_order=[2, 0, 1]), 4, DOMAINS)  # class 3 left out
    train, train_eval, test = task_datasets(data, scenario, lambda x: x, lambda x: x)
    assert len(train) == len(test) == 2
    for task, view, held_out in zip(scenario.tasks, train, test, strict=True):
        d = DOMAINS.index(task.domain)
        for split, ds in (("train", view), ("test", held_out)):
            images = getattr(data, split)
            domains = getattr(data, f"{split}_domains")
            expected = [i for i in range(len(images)) if domains[i] == d and images.labels[i] != 3]
            assert ds.indices.tolist() == expected
            assert ds.targets.tolist() == [[2, 0, 1].index(images.labels[i]) for i in expected]
            values = [int(ds[k][0][0, 0, 0]) for k in range(len(ds))]
            assert all(v // 100 == d for v in values)  # the pixels say which domain they come from
    assert [ds.indices.tolist() for ds in train_eval] == [ds.indices.tolist() for ds in train]


def test_debug_subset_keeps_images_of_every_domain() -> None:
    data = debug.subset_per_class(toy_data(per_pair=3), 2)
    assert len(data.train) == 3 * 4 * 2 and len(data.test) == 3 * 4
    values = np.array([int(data.train.image(i)[0, 0, 0]) for i in range(len(data.train))])
    assert (values // 100 == data.train_domains).all() and ((values % 100) // 10 == data.train.labels).all()
    pairs = np.stack([data.train_domains, data.train.labels], 1)
    assert (np.unique(pairs, axis=0, return_counts=True)[1] == 2).all()


def _module_with_fixed_head() -> SequentialFineTuning:
    torch.manual_seed(0)
    module = SequentialFineTuning(TinyBackbone(), epochs=0)
    scenario = build_scenario(dil(), 3, DOMAINS)
    module.on_task_start(task_context(scenario, 0, TensorDataset(torch.zeros(1, 4), torch.zeros(1))))
    return module


def test_every_domain_is_evaluated_after_each_task_and_there_is_no_til_row() -> None:
    module = _module_with_fixed_head()
    scenario = build_scenario(dil(), 3, DOMAINS)
    g = torch.Generator().manual_seed(1)
    sets = [
        TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
        for n in (5, 9, 7)
    ]
    rows = Evaluator(scenario, sets, batch_size=4).evaluate_rows(module, upto=0)
    assert rows.til == [] and len(rows.cil) == 3  # the domains not learnt yet too
    with torch.no_grad():
        expected = [
            100.0 * float((module(x).argmax(1) == y).float().mean()) for x, y in (s.tensors for s in sets)
        ]
    assert rows.cil == pytest.approx(expected)


def test_metrics_cover_all_domains_test_images() -> None:
    matrix = [[50.0, 20.0, 10.0], [40.0, 60.0, 30.0], [45.0, 55.0, 70.0]]
    sizes = [10, 30, 20]
    union = [sum(n * r for n, r in zip(sizes, row)) / sum(sizes) for row in matrix]
    summary = metrics.summarize(matrix, sizes)
    assert summary["last_acc"] == pytest.approx(union[-1])
    assert summary["avg_inc_acc"] == pytest.approx(sum(union) / 3)
    # forgetting and BWT read only the seen domains (j <= t)
    assert summary["avg_forgetting"] == pytest.approx(((50 - 45) + (60 - 55)) / 2)
    assert summary["bwt"] == pytest.approx(((45 - 50) + (55 - 60)) / 2)
    assert metrics.mean_task_accuracy(matrix, 0) == pytest.approx(80.0 / 3)
    lower = [[50.0, None, None], [40.0, 60.0, None]]  # class-incremental rows: the seen tasks only
    assert metrics.accuracy_after_task(lower, sizes, 1) == pytest.approx((10 * 40 + 30 * 60) / 40)


def test_results_and_tracking_without_a_til_matrix() -> None:
    from cl_bench.report import malformed
    from cl_bench.tracking import task_metrics

    state = RunState()
    state.record(EvaluationRows([50.0, 20.0], []), task_incremental=False)
    state.record(EvaluationRows([40.0, 60.0], []), task_incremental=False)
    assert state.til_rows == []
    doc = build_results(state.acc_rows, state.til_rows, [10, 30], [0, 1], [1.0, 2.0], 0.0, "complete", {})
    assert doc["til_acc_matrix"] == [] and doc["acc_matrix"] == [[50.0, 20.0], [40.0, 60.0]]
    assert doc["last_acc"] == pytest.approx((10 * 40 + 30 * 60) / 40)
    assert malformed(doc) is None
    logged = task_metrics(1, doc)
    assert "eval/til_mean_task_acc" not in logged and not any(k.startswith("til_acc/") for k in logged)
    assert logged["acc/task_01"] == 60.0 and logged["eval/acc_after_task"] == doc["last_acc"]


def test_report_names_a_dil_benchmark_by_its_domains() -> None:
    from cl_bench.report import _base_benchmark

    config = {
        "dataset": {"name": "domainnet"},
        "backbone": {"name": "vit"},
        "scenario": {"type": "dil", "n_tasks": 5},
    }
    assert _base_benchmark(config) == "domainnet · vit · dil all domains"
    config["scenario"]["domains"] = ["real", "sketch"]
    assert _base_benchmark(config) == "domainnet · vit · dil domains real,sketch"


def test_heads_are_sized_at_the_first_domain_and_never_grow() -> None:
    module = SequentialFineTuning(TinyBackbone(), epochs=0)
    scenario = build_scenario(dil(), 4, DOMAINS)
    data = TensorDataset(torch.zeros(1, 4), torch.zeros(1))
    for t in range(3):
        module.on_task_start(task_context(scenario, t, data))
        assert module.head.num_classes == 4 and len(module.head.blocks) == 1
    logits, targets = module.task_logits(torch.randn(2, 4), torch.tensor([3, 0]))
    assert logits.shape == (2, 4) and targets.tolist() == [3, 0]  # no task-local shift under DIL
    restored = SequentialFineTuning(TinyBackbone(), epochs=0)
    restored.load_method_state(module.method_state())
    assert restored.task == module.task and restored.task.domain == "c"


def test_prototypes_average_every_domain_seen() -> None:
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    labels_1, labels_2 = torch.tensor([0, 1, 0, 1, 2, 2]), torch.tensor([1, 2, 2, 0])
    head = PrototypeHead(5)
    head.add_task(3)
    head.fit(first, labels_1, accumulate=True)
    head.fit(second, labels_2, accumulate=True)
    features, labels = torch.cat([first, second]), torch.cat([labels_1, labels_2])
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    x = torch.randn(7, 5, generator=g)
    expected = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
    torch.testing.assert_close(head(x), expected)
    replaced = PrototypeHead(5)
    replaced.add_task(3)
    replaced.fit(first, labels_1)
    torch.testing.assert_close(
        replaced.prototypes, torch.stack([first[labels_1 == c].mean(0) for c in range(3)])
    )


def test_methods_that_cannot_learn_dil_are_refused_with_the_reason() -> None:
    assert dil_methods() == ["aper", "ranpac", "safe", "seq_ft", "simplecil"]
    for method in ("lwf", "joint", "slca", "er"):
        with pytest.raises(UnsupportedScenarioError, match=f"method={method} cannot run scenario=dil"):
            validate_config(compose_config("scenario=dil", f"method={method}"))
    validate_config(compose_config("scenario=dil", "method=seq_ft"))


# ------------------------------------------------------------------ tiny DomainNet runs (slow lane)

CLASSES = ["apple", "bus", "cat", "dog"]
RUN_DOMAINS = ["real", "sketch", "clipart"]


@pytest.fixture
def domainnet(tmp_path: Path) -> list[str]:
    root = tmp_path / "domainnet"
    write_domainnet(root, ["clipart", "real", "sketch"], CLASSES, n_train=6, n_test=3)
    return [
        "dataset=domainnet",
        f"dataset.root={root}",
        "dataset.domains=[clipart,real,sketch]",
        "scenario=dil",
        f"scenario.domains=[{','.join(RUN_DOMAINS)}]",
        "scenario.order_seed=0",
        *[o for o in RUN_OVERRIDES if not o.startswith("dataset")],
    ]


def _check_dil_document(doc: dict) -> None:
    assert doc["status"] == "complete" and doc["config"]["scenario"]["type"] == "dil"
    matrix = doc["acc_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 and None not in row for row in matrix)
    assert doc["til_acc_matrix"] == []
    # every domain has 4 classes x 3 test images: the union accuracy is the row's mean
    assert doc["last_acc"] == pytest.approx(sum(matrix[-1]) / 3)
    assert doc["avg_inc_acc"] == pytest.approx(sum(sum(row) / 3 for row in matrix) / 3)


def test_seq_ft_learns_the_domains_in_turn(run_tiny, domainnet: list[str]) -> None:
    doc, _ = run_tiny(*domainnet, "method=seq_ft", "method.epochs=1", "method.batch_size=8")
    _check_dil_document(doc)


def test_simplecil_prototypes_cover_every_domain_seen(run_tiny, domainnet: list[str]) -> None:
    """The first and last rows against prototypes computed here: class means over the first domain's, then
    over every domain's training images, scored on each domain's test set."""
    from cl_bench.saved_model import load_model

    doc, run_dir = run_tiny(*domainnet, "method=simplecil", "save_model=true")
    _check_dil_document(doc)
    model = load_model(run_dir)
    tiny = [o for o in TINY if not o.startswith("dataset")]
    exp = build_experiment(compose_config(*tiny, *domainnet, "method=simplecil"))

    def embed(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = zip(*(ds[k] for k in range(len(ds))))
        with torch.no_grad():
            return model.embed(torch.stack(x)), torch.tensor(y)

    def accuracies(seen: int) -> list[float]:
        feats, labels = zip(*(embed(ds) for ds in exp.train_eval_sets[:seen]))
        f, y = torch.cat(feats), torch.cat(labels)
        protos = torch.nn.functional.normalize(torch.stack([f[y == c].mean(0) for c in range(4)]), dim=1)
        out = []
        for ds in exp.test_sets:
            test_f, test_y = embed(ds)
            scores = torch.nn.functional.normalize(test_f, dim=1) @ protos.T
            out.append(100.0 * float((scores.argmax(1) == test_y).float().mean()))
        return out

    assert doc["acc_matrix"][0] == pytest.approx(accuracies(1))
    assert doc["acc_matrix"][-1] == pytest.approx(accuracies(3))


def test_safe_runs_its_official_dil_branch(run_tiny, domainnet: list[str]) -> None:
    doc, _ = run_tiny(
        *domainnet,
        "method=safe",
        "method.epochs=1",
        "method.batch_size=8",
        "method.rp_dim=64",
        "method.adapter_bottleneck=8",
    )
    _check_dil_document(doc)
    extra = doc["extra_matrices"]
    assert set(extra) == {"fast_acc", "slow_acc"}
    assert extra["fast_acc"] == doc["acc_matrix"]  # the code predicts with the fast learner at every domain


@pytest.mark.parametrize("method", ["ranpac", "aper"])
def test_first_session_methods_adapt_on_the_first_domain_only(
    run_tiny, domainnet: list[str], method: str
) -> None:
    doc, _ = run_tiny(
        *domainnet,
        f"method={method}",
        "method.epochs=1",
        "method.batch_size=8",
        "method.adapter_bottleneck=8",
        *(["method.rp_dim=64"] if method == "ranpac" else []),
    )
    _check_dil_document(doc)
    assert doc["task_time_s"][0] > 0
