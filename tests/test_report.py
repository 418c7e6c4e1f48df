"""``cl-bench-report``: aggregation over seeds and orders, cell labels, failed and missing runs, the files it
writes, and the HTML page in a real headless browser."""

from __future__ import annotations

import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from cl_bench.report import build_report, main, mean_std, write_report
from cl_bench.results import build_results, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(
    method: str = "seq_ft", seed: int = 0, order: int = 1993, lr: float = 0.01, **dataset: Any
) -> dict:
    return {
        "seed": seed,
        "dataset": {"name": "digits", "root": f"/data/of/machine{seed}", **dataset},
        "backbone": {"name": "resnet20_cifar"},
        "method": {"name": method, "lr": lr},
        "scenario": {"type": "cil", "n_tasks": 2, "order_seed": order},
        "paths": {"output_dir": f"/out{seed}"},
    }


def write_run(folder: Path, rows: list[list[float]], cfg: dict, status: str = "complete") -> Path:
    """A run folder as the runner leaves it: results.json, the CSVs and config.yaml."""
    folder.mkdir(parents=True)
    doc = build_results(rows, rows, [10, 10], [0, 1, 2, 3], [1.0] * len(rows), 100.0, status, cfg)
    write_results(folder, doc)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "environment.json").write_text("{}")
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """seq_ft over 3 seeds x 2 orders, linear_probe over 2 seeds, and a run at another learning rate."""
    root = tmp_path / "sweep"
    for seed in range(3):
        for order in (1993, 0):
            last = 40.0 + seed + (order == 0)
            write_run(root / f"seq_{seed}_{order}", [[80.0], [last, last]], config(seed=seed, order=order))
    for seed in range(2):
        write_run(root / f"lp_{seed}", [[90.0], [70.0 + seed, 60.0]], config("linear_probe", seed=seed))
    write_run(tmp_path / "other" / "seq_lr", [[50.0], [20.0, 30.0]], config(lr=0.1))
    return root


def test_mean_std_formats() -> None:
    assert mean_std([]) == "n/a" and mean_std([1.234]) == "1.23"
    assert mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"


def test_cells_average_seeds_and_orders_and_split_by_swept_keys(sweep: Path, tmp_path: Path) -> None:
    report = build_report([str(sweep), str(tmp_path / "other" / "*")], tmp_path / "out")
    assert report.benchmarks == ["digits · resnet20_cifar · cil 2 tasks"]  # data roots do not split
    assert report.methods == ["linear_probe", "seq_ft (method.lr=0.01)", "seq_ft (method.lr=0.1)"]
    bench = report.benchmarks[0]
    seq = report.cells[(bench, "seq_ft (method.lr=0.01)")]
    assert len(seq) == 6 and not report.problems
    expected = [40.0 + s + (o == 0) for s in range(3) for o in (1993, 0)]
    assert sorted(r.doc["last_acc"] for r in seq) == sorted(expected)
    written = write_report([str(sweep), str(tmp_path / "other" / "*")], tmp_path / "out", "cmd")
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| seq_ft (method.lr=0.01)"))
    assert f"{statistics.mean(expected):.2f} ± {statistics.stdev(expected):.2f} (n=6)" in row
    lp_forgetting = [90.0 - 70.0, 90.0 - 71.0]  # first task: best minus final accuracy
    assert any(
        f"{mean_std(lp_forgetting)} (n=2)" in line for line in md.splitlines() if "linear_probe" in line
    )
    assert len(written.runs) == 9


def test_failed_incomplete_and_missing_runs_are_listed_not_averaged(sweep: Path, tmp_path: Path) -> None:
    write_run(sweep / "stopped", [[10.0]], config(seed=9), status="incomplete")
    crashed = sweep / "crashed"
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config(seed=8)))
    (crashed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=8"]))
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"sweeper": {"params": None}, "overrides": {"task": ["seed=7,8"]}}})
    )
    report = write_report([str(sweep)], tmp_path / "out", "cmd")
    problems = "\n".join(report.problems)
    assert "stopped: incomplete: 1 of 2 tasks finished" in problems
    assert "crashed: failed before its first task ended" in problems
    assert "never ran: seed=7" in problems and "never ran: seed=8" not in problems
    assert len(report.problems) == 3
    bench = report.benchmarks[0]
    assert len(report.cells[(bench, "seq_ft")]) == 6  # the broken runs are out of the means
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count('<li class="problem">') == 3


def test_files_are_written_and_the_page_is_self_contained(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_report([str(sweep)], out, "cmd")
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) == 3  # one curve figure + one heatmap per method
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    md = (out / "report.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", md):  # figures and config links resolve from DIR
        assert (out / target).is_file(), target
    assert md.count("[config](") == 8


def test_cli_errors_and_summary(sweep: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "no such run or sweep folder" in capsys.readouterr().err
    main([str(sweep / "lp_*"), "--out", str(tmp_path / "o")])
    assert "2 complete run(s) in 1 cell(s)" in capsys.readouterr().out


def chromium_executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_page_renders_in_headless_chromium(sweep: Path, tmp_path: Path) -> None:
    """Debian's chromium driven by Playwright: tables have the methods' rows, every figure decodes."""
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the page test needs a browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    out = tmp_path / "out"
    report = write_report([str(sweep)], out, "cmd")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[*flags, "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "index.html").as_uri())
        rows = page.locator("#table-last_acc tr.method-row th").all_inner_texts()
        images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        run_rows = page.locator("#runs tr.run-row").count()
        page.screenshot(path=str(out / "screenshot.png"), full_page=True)
        browser.close()
    assert rows == report.methods == ["linear_probe", "seq_ft"]
    assert images == [True, True, True]
    assert run_rows == 8
    assert (out / "screenshot.png").stat().st_size > 10_000
