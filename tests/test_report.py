"""``cl-bench-report``: aggregation over seeds and orders, cell labels, failed and missing runs, the files it
writes, and the HTML page in a real headless browser."""

from __future__ import annotations

import json
import os
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


def write_run(
    folder: Path, rows: list[list[float]], cfg: dict, status: str = "complete", error: str | None = None
) -> Path:
    """A run folder as the runner leaves it: results.json, the CSVs and config.yaml."""
    folder.mkdir(parents=True)
    til = [[min(v + 10.0, 100.0) for v in row] for row in rows]
    doc = build_results(
        rows, til, [10, 10], [0, 1, 2, 3], [60.0] * len(rows), 100.0, status, cfg, None, error
    )
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
    assert "stopped: incomplete after 1 of 2 tasks" in problems
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
    assert len(pngs) == 4  # one bar chart, one curve figure, one heatmap per method
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script src" not in page and "http" not in page.split("<script>")[1]
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


def test_out_defaults_to_report_in_the_current_folder(
    sweep: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    main([str(sweep)])
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "report.md").is_file()
    assert "wrote report/index.html" in capsys.readouterr().out


def test_the_same_run_folder_reached_twice_counts_once(sweep: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(sweep)
    report = build_report([str(sweep), str(sweep / "seq_0_1993"), str(tmp_path / "link")], tmp_path / "out")
    bench = report.benchmarks[0]
    assert len(report.runs) == 8 and len(report.cells[(bench, "seq_ft")]) == 6


def test_metrics_columns_til_bwt_time_memory(sweep: Path, tmp_path: Path) -> None:
    write_report([str(sweep)], tmp_path / "out", "cmd")
    md = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| benchmark | method | runs |"))
    for title in ("Backward transfer", "TIL last accuracy", "Time (min)", "Peak memory (MB)"):
        assert title in header
    row = next(
        line for line in md.splitlines() if line.startswith("| digits") and "| linear_probe | 2 |" in line
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    # linear_probe: last rows [70, 60] and [71, 60]; TIL = +10 capped at 100 -> (80+70)/2 and (81+70)/2
    assert cells[3] == mean_std([65.0, 65.5])  # last acc
    assert cells[6] == mean_std([-20.0, -19.0])  # BWT: (acc[1][0] - acc[0][0])
    assert cells[7] == mean_std([75.0, 75.5])  # TIL last accuracy
    assert cells[8] == "2.00 ± 0.00"  # 2 tasks x 60 s
    assert cells[9] == "100.00 ± 0.00"


def test_failed_runs_show_their_first_error_line(sweep: Path, tmp_path: Path) -> None:
    write_run(
        sweep / "oom", [[10.0]], config(seed=5), "incomplete", "OutOfMemoryError: CUDA out of memory\nTrace"
    )
    early = sweep / "early"
    (early / ".hydra").mkdir(parents=True)
    (early / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config(seed=6)))
    (early / "cli.log").write_text(
        "[2026-01-01 10:00:00,000][cl_bench][INFO] - start\n"
        "[2026-01-01 10:00:01,000][cl_bench][ERROR] - dataset.path=/x: no such file\n"
    )
    problems = "\n".join(build_report([str(sweep)], tmp_path / "out").problems)
    assert "oom: failed after 1 of 2 tasks: OutOfMemoryError: CUDA out of memory" in problems
    assert "Trace" not in problems
    assert (
        "early: failed before its first task ended (no results.json): dataset.path=/x: no such file"
        in problems
    )


def test_malformed_inputs_are_listed_never_a_crash(sweep: Path, tmp_path: Path, capsys) -> None:
    bad = {
        "torn": "{not json",
        "list": "[1, 2]",
        "no_matrix": json.dumps({"status": "complete", "config": {}}),
        "strings": json.dumps(
            {**json.loads((sweep / "lp_0" / "results.json").read_text()), "last_acc": "high"}
        ),
        # each of these used to end the whole report with a traceback
        "nan": json.dumps({**json.loads((sweep / "lp_0" / "results.json").read_text()), "bwt": float("nan")}),
        "til_gap": json.dumps(
            {**json.loads((sweep / "lp_0" / "results.json").read_text()), "til_acc_matrix": [[None]]}
        ),
        "deep": "[" * 100_000 + "]" * 100_000,
    }
    for name, text in bad.items():
        (sweep / name).mkdir()
        (sweep / name / "results.json").write_text(text)
    (sweep / "latin1").mkdir()
    (sweep / "latin1" / "results.json").write_bytes(b'{"status": "compl\xe8te"}')
    (sweep / "badyaml" / ".hydra").mkdir(parents=True)
    (sweep / "badyaml" / ".hydra" / "config.yaml").write_text("a: [unclosed")
    (sweep / "multirun.yaml").write_text("hydra: [")
    main([str(sweep), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert "8 complete run(s)" in capsys.readouterr().out
    problems = (tmp_path / "o" / "report.md").read_text()
    assert "torn: unreadable results.json" in problems
    assert "list: malformed results.json: not a JSON object" in problems
    assert "no_matrix: malformed results.json: acc_matrix is missing" in problems
    assert "strings: malformed results.json: last_acc is missing or not a number" in problems
    assert "nan: malformed results.json: bwt is missing or not a number" in problems
    assert "til_gap: malformed results.json: til_acc_matrix has no value on its diagonal" in problems
    assert "deep: unreadable results.json (" in problems and "is nested too deeply)" in problems
    assert "latin1: unreadable results.json ('utf-8' codec can't decode" in problems
    assert "badyaml: unreadable config.yaml" in problems
    assert "multirun.yaml: unreadable sweep file" in problems
    assert "nowhere: no such run or sweep folder" in problems


def test_smoke_runs_are_listed_but_never_in_the_tables(sweep: Path, tmp_path: Path) -> None:
    write_run(sweep / "smoke", [[99.0], [99.0, 99.0]], {**config(seed=4), "debug": {"smoke": True}})
    report = write_report([str(sweep)], tmp_path / "out", "cmd")
    bench = report.benchmarks[0]
    assert len(report.cells[(bench, "seq_ft")]) == 6 and not report.problems
    assert "99.00" not in (tmp_path / "out" / "report.md").read_text().split("## Runs\n")[0]
    assert "complete (smoke run, not in the tables)" in (tmp_path / "out" / "report.md").read_text()


def test_skipped_jobs_and_smoke_runs_leave_the_labels_of_complete_runs_alone(
    sweep: Path, tmp_path: Path
) -> None:
    """A sweep job skipped before results.json (its .hydra/config.yaml still holds ``${paths.data_dir}``) is
    listed as skipped, not failed; neither it nor a smoke run (its caps and limits) renames the cells."""
    skipped = sweep / "9_method=l2p"
    (skipped / ".hydra").mkdir(parents=True)
    cfg = config("l2p", seed=0, path="${paths.data_dir}/digits.npz")
    cfg["paths"]["data_dir"] = "/data"
    (skipped / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (skipped / "skipped.txt").write_text(
        "method=l2p cannot run on the backbone resnet20_cifar: it needs ViT\n"
    )
    smoke = {**config(seed=4), "debug": {"smoke": True, "max_tasks": 2}, "trainer": {"max_epochs": 1}}
    write_run(sweep / "smoke", [[99.0], [99.0, 99.0]], smoke)
    for name in list(sweep.iterdir()):
        if name.name.startswith(("seq_", "lp_")):  # the finished runs' resolved data path
            doc = json.loads((name / "results.json").read_text())
            doc["config"]["dataset"]["path"] = "/data/digits.npz"
            (name / "results.json").write_text(json.dumps(doc))
    report = write_report([str(sweep)], tmp_path / "out", "cmd")
    assert report.benchmarks == ["digits · resnet20_cifar · cil 2 tasks"]
    assert report.methods == ["linear_probe", "seq_ft"]
    problems = "\n".join(report.problems)
    assert "9_method=l2p: skipped: method=l2p cannot run on the backbone resnet20_cifar" in problems
    assert "failed" not in problems and len(report.problems) == 1


def test_a_report_of_smoke_runs_only_says_so(tmp_path: Path) -> None:
    write_run(tmp_path / "smoke", [[99.0], [99.0, 99.0]], {**config(), "debug": {"smoke": True}})
    write_report([str(tmp_path / "smoke")], tmp_path / "out", "cmd")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| method |  |" not in md and "no complete runs (smoke runs are never in the tables)" in md


def test_a_rerun_that_resumed_elsewhere_counts_once_and_is_not_a_failure(sweep: Path, tmp_path: Path) -> None:
    """A rerun sweep's job that resumed the interrupted run in its old folder leaves only .hydra/ and
    results_in.txt in its new folder: the report reads the old folder's results, counts them once when both
    sweeps are given, and the new sweep's multirun.yaml does not list the job as never run."""
    rerun = tmp_path / "rerun"
    (rerun / "0_seed=0" / ".hydra").mkdir(parents=True)
    (rerun / "0_seed=0" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config(seed=0)))
    (rerun / "0_seed=0" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=0"]))
    (rerun / "0_seed=0" / "results_in.txt").write_text(f"{sweep / 'seq_0_1993'}\n")
    (rerun / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"sweeper": {"params": None}, "overrides": {"task": ["seed=0"]}}})
    )
    alone = build_report([str(rerun)], tmp_path / "o1")
    assert not alone.problems and [r.folder for r in alone.runs] == [sweep / "seq_0_1993"]
    both = build_report([str(sweep), str(rerun)], tmp_path / "o2")
    assert len(both.runs) == 8 and not both.problems


def chromium_executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_page_renders_and_sorts_and_filters_in_headless_chromium(sweep: Path, tmp_path: Path) -> None:
    """Debian's chromium driven by Playwright: tables have the methods' rows, every figure decodes, a click on
    a header sorts the rows (again: the other way), typing in a filter box hides the other rows. In CI (the
    CI variable set) a missing browser fails the test instead of skipping it."""
    executable = chromium_executable()
    if executable is None:
        message = "no chromium on PATH (Debian: apt-get install chromium); the page test needs a browser"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright import sync_api
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (it is in the dev extra)")
        pytest.skip("playwright is in the dev extra")
    out = tmp_path / "out"
    report = write_report([str(sweep), str(sweep.parent / "other")], out, "cmd")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[*flags, "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto((out / "index.html").as_uri())
        rows = page.locator("#table-last_acc tr.method-row th").all_inner_texts()
        images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        run_rows = page.locator("#runs tr.run-row").count()

        def column(table: str, index: int) -> list[str]:
            return page.locator(f"#{table} tbody tr").evaluate_all(
                f"rows => rows.filter(r => !r.hidden).map(r => r.cells[{index}].textContent)"
            )

        last_acc_col = 1  # methods x benchmarks: one benchmark column
        page.click("#table-last_acc thead th >> nth=1")
        ascending = column("table-last_acc", last_acc_col)
        page.click("#table-last_acc thead th >> nth=1")
        descending = column("table-last_acc", last_acc_col)
        page.click("#runs thead th >> text=seed")
        seeds = column("runs", 2)
        page.fill('input[data-table="runs"]', "linear_probe")
        filtered = column("runs", 1)
        page.screenshot(path=str(out / "screenshot.png"), full_page=True)
        browser.close()
    assert rows == report.methods == ["linear_probe", "seq_ft (method.lr=0.01)", "seq_ft (method.lr=0.1)"]
    means = [float(text.split()[0]) for text in ascending]
    assert means == sorted(means) and len(means) == 3
    assert [float(text.split()[0]) for text in descending] == sorted(means, reverse=True)
    assert seeds == sorted(seeds, key=int)
    assert filtered == ["linear_probe", "linear_probe"]
    assert all(images) and len(images) == 5
    assert run_rows == 9
    assert all(url.startswith(("file:", "data:")) for url in requests)
    assert (out / "screenshot.png").stat().st_size > 10_000
