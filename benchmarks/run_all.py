"""Runs every benchmarks/bench_*.py and refreshes results/ and the tables in RESULTS.md.

    python benchmarks/run_all.py                      # every benchmark, full size
    python benchmarks/run_all.py --only qp --only deq # some of them
    python benchmarks/run_all.py --quick              # smoke run: *_quick.* files only
    python benchmarks/run_all.py --render-only        # RESULTS.md from results/ as they are

Each benchmark runs in its own Python process, one after the other (a fresh TensorFlow
each, no two competing for the cores), and writes results/<name>.json and
results/<name>.md itself. Then every block of RESULTS.md between
`<!-- results:<name> -->` and `<!-- /results:<name> -->` is replaced by results/<name>.md
(folded into a <details> element), and the `<!-- results:header -->` block by the run's
record: date, CPU count, library versions, and for each benchmark its duration, exit
status and 1/5/15-minute load averages before and after (kept in results/run_all.json,
merged over partial runs). Text outside the markers is never touched.

A quick run passes `--quick` to the benchmarks that take it (they write *_quick.* files),
skips the others, and leaves RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import datetime
import html
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
# ours and the peers the benchmarks compare against (a missing peer's rows are skipped)
LIBRARIES = (
    "tensorflow",
    "keras",
    "numpy",
    "scipy",
    "jax",
    "jaxopt",
    "cvxpy",
    "cvxpylayers",
    "scikit-learn",
    "celer",
    "keras-tuner",
    "torch",
    "torchdeq",
)
HEADER = "header"
BLOCK = re.compile(
    r"(?P<open><!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)"
    r"(?P<close><!-- /results:(?P=name) -->)",
    re.DOTALL,
)
QUICK_OPTION = re.compile(r"add_argument\(\s*[\"']--quick[\"']")


# ------------------------------------------------------------------ discovery and runs


def discover(directory):
    """{name: path} of the bench_<name>.py scripts in `directory`, sorted by name."""
    scripts = sorted(pathlib.Path(directory).glob("bench_*.py"))
    return {path.stem[len("bench_") :]: path for path in scripts}


def takes_quick(script):
    """Whether the script declares a `--quick` option (read from its source, not run)."""
    return QUICK_OPTION.search(pathlib.Path(script).read_text()) is not None


def load_average():
    return [round(value, 2) for value in os.getloadavg()]


def run_one(name, script, quick):
    """Runs one benchmark in a subprocess (output passed through); returns its record."""
    command = [sys.executable, str(script), *(["--quick"] if quick else [])]
    print(f"[run_all] {name}: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    before, start = load_average(), time.monotonic()
    code = subprocess.run(command, cwd=script.parent.parent, env=env, check=False).returncode
    record = {
        "date": _now(),
        "seconds": round(time.monotonic() - start, 1),
        "returncode": code,
        "load_before": before,
        "load_after": load_average(),
        "quick": quick,
    }
    print(f"[run_all] {name}: exit {code} after {record['seconds']} s", flush=True)
    return record


def versions():
    """Installed versions of the libraries the benchmarks compare (None: not installed)."""
    found = {}
    for library in LIBRARIES:
        try:
            found[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            found[library] = None
    return found


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine():
    return {
        "date": _now(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
    }


# ------------------------------------------------------------------ RESULTS.md


def render_results(name, text):
    """The block for results/<name>.md: its title as the summary, the rest folded."""
    lines = text.strip().splitlines()
    title = f"Full tables of the last run (results/{name}.md)"
    if lines and lines[0].startswith("# "):
        title = f"{lines[0][2:].strip()} (results/{name}.md)"
        lines = lines[1:]
    body = "\n".join(lines).strip()
    return f"<details><summary>{html.escape(title)}</summary>\n\n{body}\n\n</details>\n"


def _versions_text(found):
    return ", ".join(f"{lib} {ver or 'not installed'}" for lib, ver in found.items())


def _load_text(values):
    return " / ".join(f"{v:.2f}" for v in values)


def render_header(record):
    """The header block from results/run_all.json's record."""
    meta = record["machine"]
    lines = [
        f"Generated by `python benchmarks/run_all.py` on {meta['date']}: {meta['cpu_count']} "
        f"CPUs, {meta['platform']}, Python {meta['python']}; {_versions_text(meta['versions'])}.",
        "Load averages are 1 / 5 / 15 minutes, read before and after each benchmark.",
        "",
        "| benchmark | run on | seconds | load before | load after | status |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for name, run in sorted(record["benchmarks"].items()):
        status = "ok" if run["returncode"] == 0 else f"**failed** (exit {run['returncode']})"
        lines.append(
            f"| {name} | {run['date']} | {run['seconds']:.0f} | {_load_text(run['load_before'])} "
            f"| {_load_text(run['load_after'])} | {status} |"
        )
    return "\n".join(lines) + "\n"


def render(text, results_dir, record=None):
    """RESULTS.md text with every marker block refilled; returns (text, names not filled).

    A block whose results/<name>.md is missing (or the header without a record) keeps
    its current content.
    """
    missing = []

    def fill(match):
        name = match["name"]
        if name == HEADER:
            body = render_header(record) if record else None
        else:
            path = pathlib.Path(results_dir) / f"{name}.md"
            body = render_results(name, path.read_text()) if path.exists() else None
        if body is None:
            missing.append(name)
            return match[0]
        return f"{match['open']}{body}{match['close']}"

    return BLOCK.sub(fill, text), missing


def block_names(text):
    return [match["name"] for match in BLOCK.finditer(text)]


# ------------------------------------------------------------------ main


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; RESULTS.md untouched")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only bench_NAME.py (repeatable); the other results are kept",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="run nothing; refill RESULTS.md from results/"
    )
    parser.add_argument(
        "--dir", type=pathlib.Path, default=HERE, help="the benchmarks directory (default: here)"
    )
    return parser.parse_args(argv)


def _select(scripts, only, quick):
    """(to run: {name: path}, skipped: {name: reason}) for --only and --quick."""
    unknown = sorted(set(only or ()) - set(scripts))
    if unknown:
        raise SystemExit(f"run_all: no bench_<name>.py for {unknown}; known: {sorted(scripts)}")
    chosen = {name: path for name, path in scripts.items() if not only or name in only}
    skipped = {}
    if quick:
        skipped = {name: "no --quick option" for name in chosen if not takes_quick(chosen[name])}
    return {k: v for k, v in chosen.items() if k not in skipped}, skipped


def _update_record(path, runs):
    record = json.loads(path.read_text()) if path.exists() else {"benchmarks": {}}
    record["machine"] = machine()
    record["benchmarks"].update(runs)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None):
    args = _parse(argv)
    directory = args.dir.resolve()
    results_dir, results_md = directory / "results", directory / "RESULTS.md"
    record_path = results_dir / ("run_all_quick.json" if args.quick else "run_all.json")
    failed = []
    if args.render_only:
        record = json.loads(record_path.read_text()) if record_path.exists() else None
    else:
        to_run, skipped = _select(discover(directory), args.only, args.quick)
        for name, reason in skipped.items():
            print(f"[run_all] {name}: skipped ({reason})", flush=True)
        runs = {name: run_one(name, script, args.quick) for name, script in to_run.items()}
        failed = [name for name, run in runs.items() if run["returncode"] != 0]
        results_dir.mkdir(exist_ok=True)
        record = _update_record(record_path, runs)
    if args.quick:
        print("[run_all] quick run: RESULTS.md left as it is", flush=True)
    else:
        text, missing = render(results_md.read_text(), results_dir, record)
        results_md.write_text(text)
        print(f"[run_all] {results_md} refilled: {block_names(text)}", flush=True)
        if missing:
            print(f"[run_all] blocks left as they were (no results): {missing}", flush=True)
        unplaced = sorted(set(discover(directory)) - set(block_names(text)))
        if unplaced:
            print(f"[run_all] no block in RESULTS.md for: {unplaced}", flush=True)
    if failed:
        print(f"[run_all] failed: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
