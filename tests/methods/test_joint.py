"""Joint training: one task of all classes (upper bound)."""

from __future__ import annotations


def test_joint_is_one_task_of_all_classes(run_tiny) -> None:
    doc, _ = run_tiny(
        "method=joint", "method.epochs=2", "method.batch_size=32", "method.lr=0.05", "scenario.n_tasks=5"
    )
    assert len(doc["acc_matrix"]) == 1 and len(doc["acc_matrix"][0]) == 1
    assert doc["avg_forgetting"] is None and doc["bwt"] is None
    assert doc["last_acc"] == doc["acc_matrix"][0][0] == doc["avg_inc_acc"]
    assert doc["last_acc"] > 30.0  # 10 classes: chance is 10 %
    assert sorted(doc["class_order"]) == list(range(10))


def test_joint_under_til_reports_task_aware_accuracy(run_tiny) -> None:
    doc, _ = run_tiny(
        "method=joint", "method.epochs=1", "method.batch_size=32", "method.lr=0.05", "scenario=til"
    )
    assert doc["acc_matrix"] == doc["til_acc_matrix"] and len(doc["acc_matrix"]) == 1
    assert doc["config"]["scenario"]["type"] == "til"
