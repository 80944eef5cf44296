"""benchmarks/run_all.py: marker blocks of RESULTS.md, the run record, --only / --quick.

Runs no real benchmark: the end-to-end tests use two tiny stand-in bench_*.py scripts
in a temporary directory."""

import importlib.util
import json
import os
import pathlib
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

_spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)

PROSE = "# Results\n\nIntro prose.\n\n"
TABLE = "| a | b |\n| --- | --- |\n| 1 | 2 |\n"


def _outside_blocks(text):
    return run_all.BLOCK.sub(lambda m: f"{m['open']}{m['close']}", text)


def test_render_fills_only_the_blocks(tmp_path):
    (tmp_path / "alpha.md").write_text(f"# Alpha <run>\n\nCaption.\n\n{TABLE}")
    text = (
        PROSE
        + "<!-- results:alpha -->\nold alpha\n<!-- /results:alpha -->\n\nMiddle prose.\n\n"
        + "<!-- results:beta -->\nold beta\n<!-- /results:beta -->\nEnd.\n"
    )
    new, missing = run_all.render(text, tmp_path)
    assert missing == ["beta"]  # no results/beta.md: the block keeps its content
    expected_alpha = (
        "<!-- results:alpha -->\n"
        "<details><summary>Alpha &lt;run&gt; (results/alpha.md)</summary>\n\n"
        f"Caption.\n\n{TABLE}\n</details>\n"
        "<!-- /results:alpha -->"
    )
    assert expected_alpha in new
    assert "old alpha" not in new and "old beta" in new
    assert _outside_blocks(new) == _outside_blocks(text)
    # idempotent, and a changed results file replaces the old table
    assert run_all.render(new, tmp_path)[0] == new
    (tmp_path / "alpha.md").write_text("| c |\n| --- |\n| 3 |\n")
    again, _ = run_all.render(new, tmp_path)
    assert "| 3 |" in again and "| 1 | 2 |" not in again
    assert "<summary>Full tables of the last run (results/alpha.md)</summary>" in again


def test_header_lists_versions_loads_and_failures():
    record = {
        "machine": {
            "date": "2026-12-05 10:00 UTC",
            "cpu_count": 2,
            "platform": "Linux",
            "python": "3.11.9",
            "versions": {"tensorflow": "2.21.0", "jaxopt": None},
        },
        "benchmarks": {
            "qp": {
                "date": "2026-12-05 10:01 UTC",
                "seconds": 61.04,
                "returncode": 0,
                "load_before": [0.5, 0.25, 1.0],
                "load_after": [1.5, 0.75, 1.0],
            },
            "core": {
                "date": "2026-12-05 10:00 UTC",
                "seconds": 12.0,
                "returncode": 2,
                "load_before": [0.0, 0.0, 0.0],
                "load_after": [0.1, 0.0, 0.0],
            },
        },
    }
    header = run_all.render_header(record)
    assert "2 CPUs" in header and "tensorflow 2.21.0, jaxopt not installed" in header
    rows = [line for line in header.splitlines() if line.startswith("| core") or "| qp" in line]
    assert rows == [
        "| core | 2026-12-05 10:00 UTC | 12 | 0.00 / 0.00 / 0.00 | 0.10 / 0.00 / 0.00 "
        "| **failed** (exit 2) |",
        "| qp | 2026-12-05 10:01 UTC | 61 | 0.50 / 0.25 / 1.00 | 1.50 / 0.75 / 1.00 | ok |",
    ]


def test_results_md_blocks_name_benchmarks():
    """The real RESULTS.md: every block names a benchmark, and refilling it (on a copy)
    changes nothing outside the blocks."""
    text = (BENCHMARKS / "RESULTS.md").read_text()
    names = run_all.block_names(text)
    assert names[0] == run_all.HEADER
    assert len(names) == len(set(names))
    assert set(names[1:]) <= set(run_all.discover(BENCHMARKS))
    new, _ = run_all.render(text, BENCHMARKS / "results")
    assert _outside_blocks(new) == _outside_blocks(text)
    assert sorted(run_all.versions()) == sorted(run_all.LIBRARIES)


# a stand-in benchmark: writes results/<name>[_quick].md with its argv
_BENCH = textwrap.dedent(
    """
    import argparse, pathlib, sys
    name = pathlib.Path(__file__).stem[len("bench_"):]
    {options}
    out = pathlib.Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    table = f"| argv |\\n| --- |\\n| {{sys.argv[1:]}} |\\n"
    (out / f"{{name}}{{suffix}}.md").write_text(f"# {{name}}\\n\\n{{table}}")
    sys.exit({code})
    """
)
_QUICK = (
    "parser = argparse.ArgumentParser(); parser.add_argument('--quick', action='store_true'); "
    "suffix = '_quick' if parser.parse_args().quick else ''"
)


def _bench_dir(tmp_path, fail=False):
    (tmp_path / "bench_fast.py").write_text(_BENCH.format(options=_QUICK, code=0))
    (tmp_path / "bench_slow.py").write_text(_BENCH.format(options="suffix = ''", code=3 * fail))
    blocks = "".join(f"<!-- results:{n} -->\n<!-- /results:{n} -->\n" for n in ("header", "fast"))
    (tmp_path / "RESULTS.md").write_text(PROSE + blocks)
    return tmp_path


def test_run_only_one_benchmark_and_merge_records(tmp_path):
    directory = _bench_dir(tmp_path, fail=True)
    assert run_all.main(["--dir", str(directory), "--only", "fast"]) == 0
    text = (directory / "RESULTS.md").read_text()
    assert "| [] |" in text  # fast ran without --quick; its table is in RESULTS.md
    assert "| fast |" in text and "| slow |" not in text and "jaxopt" in text
    assert not (directory / "results" / "slow.md").exists()
    # the next run of `slow` fails: reported, recorded, and `fast`'s record is kept
    assert run_all.main(["--dir", str(directory), "--only", "slow"]) == 1
    record = json.loads((directory / "results" / "run_all.json").read_text())
    assert sorted(record["benchmarks"]) == ["fast", "slow"]
    assert record["benchmarks"]["slow"]["returncode"] == 3
    assert len(record["benchmarks"]["fast"]["load_before"]) == 3
    assert "**failed** (exit 3)" in (directory / "RESULTS.md").read_text()
    with pytest.raises(SystemExit, match="no bench_<name>.py for \\['nope'\\]"):
        run_all.main(["--dir", str(directory), "--only", "nope"])


def test_quick_skips_benchmarks_without_it_and_leaves_results_md(tmp_path):
    directory = _bench_dir(tmp_path)
    before = (directory / "RESULTS.md").read_text()
    assert run_all.main(["--dir", str(directory), "--quick"]) == 0
    results = directory / "results"
    assert (results / "fast_quick.md").read_text().endswith("| ['--quick'] |\n")
    assert not (results / "slow_quick.md").exists() and not (results / "slow.md").exists()
    assert (directory / "RESULTS.md").read_text() == before
    record = json.loads((results / "run_all_quick.json").read_text())
    assert list(record["benchmarks"]) == ["fast"] and record["benchmarks"]["fast"]["quick"]


@pytest.mark.parametrize("name", sorted(run_all.discover(BENCHMARKS)))
def test_every_benchmark_imports(name, monkeypatch):
    """Each real bench_*.py loads (its imports of the package's internals still resolve);
    running it is `run_all`'s job. Environment variables it sets are undone."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what it sets stays in a copy
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
