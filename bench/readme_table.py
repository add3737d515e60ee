#!/usr/bin/env python
"""Write the README's headline speed table from the latest end-to-end results file.

    python bench/readme_table.py           # rewrite the table between the README's markers
    python bench/readme_table.py --check   # exit 1 if the README's table is not the generated one
    python bench/readme_table.py --results bench/results/FILE.md   # from that file instead

A second table, between the suite-table markers, gives every network of the suite: per network
the fastcnn / PyTorch ratios of its latest results file at 2 threads (default malloc).

The latest results file is the one with the latest ``date:`` among those under bench/results/
that ``bench/bench_end_to_end.py`` wrote for the reference network against PyTorch (no
``--baseline``, no other ``--network``) with a throughput table. The table shows the training
and inference rows at batch 64 and 128 of the default-malloc table (what a user gets), with the
tuned-malloc ratio beside them; the line above it gives the date, CPU, versions, git revision,
command and file.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
README = os.path.join(REPO, "README.md")
RESULTS_DIR = os.path.join(HERE, "results")
BEGIN, END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"
SUITE_BEGIN, SUITE_END = "<!-- suite-table:begin -->", "<!-- suite-table:end -->"
BATCHES = (64, 128)
#: The networks of the suite table, in its order (fastcnn.models.BUILDERS' names).
SUITE = ("reference", "lenet5", "resnet8", "resnet20", "vgg", "allconv")


def parse(path):
    """A results file of bench_end_to_end.py -> its header fields and throughput tables.

    Returns {"command", "date", "revision", "machine", "versions", "tables"}, where tables maps
    "default" / "tuned" (the malloc) to a list of rows, each a dict keyed by the column names.
    """
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    head = {}
    for line in lines[:12]:
        if line.startswith("command: "):
            head["command"] = line[len("command: ") :]
        elif line.startswith("date: "):
            m = re.match(r"date: (\S+ \S+)\s+repo: .* @ (\S+)", line)
            if m:
                head["date"], head["revision"] = m.groups()
        elif line.startswith("machine: "):
            head["machine"] = line[len("machine: ") :].split(", load average")[0]
        elif line.startswith("python "):
            head["versions"] = line
    tables, malloc = {}, None
    for i, line in enumerate(lines):
        if line.startswith(("Default malloc", "Tuned malloc")):
            malloc = line.split()[0].lower()
        elif line.startswith("| threads | batch | mode |") and malloc and malloc not in tables:
            columns = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(
                    dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=False))
                )
            tables[malloc] = rows
    head["tables"] = tables
    return head


def network_of(result):
    """The network a results file measured against PyTorch (None: not an end-to-end run of
    one, or an A/B run against another checkout)."""
    argv = shlex.split(result.get("command", ""))
    if "bench/bench_end_to_end.py" not in argv or "--baseline" in argv:
        return None
    return argv[argv.index("--network") + 1] if "--network" in argv else "reference"


def is_headline(result):
    """The reference network against PyTorch, with a throughput table to show, from a run of
    the benchmark's default threads and mallocs (the headline shows them all)."""
    argv = shlex.split(result.get("command", ""))
    if network_of(result) != "reference" or "--threads" in argv or "--malloc" in argv:
        return False
    return "default" in result["tables"] and "date" in result


def suite_table(directory=RESULTS_DIR, threads="2"):
    """The README's suite block: per network, the latest results file's fastcnn / PyTorch ratios
    (default malloc, ``threads`` threads, batch 64 and 128, training and inference), and
    "/ TF" the fastcnn / TensorFlow ratio beside each where the file has one. Only files with
    every one of those columns count (not, e.g., a run of one batch at 1 and 2 threads)."""
    keys = [(b, m) for m in ("train", "infer") for b in BATCHES]
    latest_of = {}
    for path in glob.glob(os.path.join(directory, "*.md")):
        r = parse(path)
        net = network_of(r)
        rows = [row for row in r["tables"].get("default", []) if row["threads"] == threads]
        covered = {(int(row["batch"]), row["mode"]) for row in rows}
        if net in SUITE and set(keys) <= covered and "date" in r:
            latest_of[net] = max(latest_of.get(net, ("", None, None)), (r["date"], path, rows))
    out = [
        f"| network | {' | '.join(f'{m} {b}' for b, m in keys)} | results file |",
        "|---|" + "---:|" * len(keys) + "---|",
    ]
    for net in SUITE:
        if net not in latest_of:
            continue
        date, path, rows = latest_of[net]
        ratio = {
            (int(row["batch"]), row["mode"]): row["ratio"]
            + (f" / {row['fastcnn / tensorflow']}" if row.get("fastcnn / tensorflow") else "")
            for row in rows
        }
        rel = os.path.relpath(path, REPO)
        out.append(
            f"| {net} | {' | '.join(ratio.get(k, '-') for k in keys)} | [{date[:10]}]({rel}) |"
        )
    return "\n".join(out)


def latest(directory=RESULTS_DIR):
    """Path of the latest headline results file under ``directory`` (ValueError if none)."""
    found = []
    for path in glob.glob(os.path.join(directory, "*.md")):
        result = parse(path)
        if is_headline(result):
            found.append((result["date"], path))
    if not found:
        raise ValueError(f"no end-to-end results file of the reference network in {directory}")
    return max(found)[1]


def table(path):
    """The README's block (without the markers) for the results file at ``path``."""
    r = parse(path)
    tuned = {
        (t["threads"], t["batch"], t["mode"]): t["ratio"] for t in r["tables"].get("tuned", [])
    }
    peer = next(
        c for c in r["tables"]["default"][0] if c.endswith(" img/s") and c != "fastcnn img/s"
    )
    rows = [row for row in r["tables"]["default"] if int(row["batch"]) in BATCHES]
    tf = "tensorflow img/s" in r["tables"]["default"][0]  # the second peer, when measured
    rel = os.path.relpath(path, REPO)
    out = [
        f"`{r['command']}`, {r['date'][:10]}, git {r['revision']}: {r['machine']}; "
        f"{r['versions']}.",
        "Images/s, medians of alternating blocks; the last column is the ratio with glibc's malloc",
        f"tuned (bench/README.md). Every table of the run: [`{rel}`]({rel}).",
        "",
        "| threads | batch | mode | fastcnn | PyTorch | fastcnn / PyTorch | "
        + ("TensorFlow | fastcnn / TensorFlow | " if tf else "")
        + "same as PyTorch, tuned malloc |",
        "|---:|---:|---|---:|---:|---:|" + ("---:|---:|" if tf else "") + "---:|",
    ]
    for row in rows:
        key = (row["threads"], row["batch"], row["mode"])
        second = f"{row['tensorflow img/s']} | {row['fastcnn / tensorflow']} | " if tf else ""
        out.append(
            f"| {' | '.join(key)} | {row['fastcnn img/s']} | {row[peer]} | {row['ratio']} | "
            f"{second}{tuned.get(key, '-')} |"
        )
    return "\n".join(out)


def rewrite(readme_text, block, begin=BEGIN, end_marker=END):
    """``readme_text`` with ``block`` between the markers (ValueError if they are missing)."""
    start, end = readme_text.find(begin), readme_text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {begin} ... {end_marker} markers")
    return readme_text[: start + len(begin)] + "\n" + block + "\n" + readme_text[end:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    p.add_argument("--results", help="results file to use [the latest under bench/results/]")
    p.add_argument("--readme", default=README, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    path = args.results or latest()
    with open(args.readme, encoding="utf-8") as fh:
        text = fh.read()
    new = rewrite(text, table(path))
    if SUITE_BEGIN in new:
        new = rewrite(new, suite_table(), SUITE_BEGIN, SUITE_END)
    if args.check:
        if new != text:
            print(
                f"{args.readme}: the speed table is not the one generated from {path}; "
                "run python bench/readme_table.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != text:
        with open(args.readme, "w", encoding="utf-8") as fh:
            fh.write(new)
    print(f"{args.readme}: speed table from {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
