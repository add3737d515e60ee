"""The README's speed table is generated from the latest results file (bench/readme_table.py),
and the benchmark's results files are written as that script reads them (bench/results_file.py).
Fast: nothing is benchmarked."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import readme_table  # noqa: E402
import results_file  # noqa: E402


def test_committed_results_file_parses():
    path = readme_table.latest()
    result = readme_table.parse(path)
    assert result["command"].startswith("python bench/bench_end_to_end.py")
    assert result["date"][:4].isdigit() and result["revision"]
    for malloc in ("default", "tuned"):
        rows = result["tables"][malloc]
        assert {(r["threads"], r["batch"], r["mode"]) for r in rows} >= {
            ("2", "64", "train"),
            ("2", "128", "train"),
            ("2", "128", "infer"),
        }
        for r in rows:
            assert r["ratio"].endswith("x") and r["fastcnn img/s"].replace(",", "").isdigit()


def test_readme_table_is_generated(capsys):
    """Fails when a newer results file came in and the README was not regenerated:
    run python bench/readme_table.py."""
    status = readme_table.main(["--check"])
    assert status == 0, capsys.readouterr().err


def test_check_fails_on_a_stale_readme(tmp_path):
    with open(readme_table.README, encoding="utf-8") as fh:
        text = fh.read()
    stale = tmp_path / "README.md"
    stale.write_text(text.replace("| 2 | 64 | train |", "| 2 | 64 | train | 1 |", 1))
    assert readme_table.main(["--check", "--readme", str(stale)]) == 1
    assert readme_table.main(["--readme", str(stale)]) == 0  # rewrites it
    assert stale.read_text() == text
    with pytest.raises(ValueError, match="markers"):
        readme_table.rewrite("no markers here", "table")


def test_latest_skips_ab_runs_and_other_networks(tmp_path):
    with open(readme_table.latest(), encoding="utf-8") as fh:
        text = fh.read()
    old_date = readme_table.parse(readme_table.latest())["date"]
    newer = text.replace(old_date, "2099" + old_date[4:])  # a later date
    (tmp_path / "a-reference.md").write_text(text)
    (tmp_path / "b-ab.md").write_text(
        newer.replace("bench_end_to_end.py", "bench_end_to_end.py --baseline /tmp/base", 1)
    )
    (tmp_path / "c-resnet.md").write_text(
        newer.replace("bench_end_to_end.py", "bench_end_to_end.py --network resnet20", 1)
    )
    (tmp_path / "d-cut.md.partial").write_text(newer)
    assert readme_table.latest(str(tmp_path)) == str(tmp_path / "a-reference.md")
    (tmp_path / "e-reference.md").write_text(newer)
    assert readme_table.latest(str(tmp_path)) == str(tmp_path / "e-reference.md")


def test_suite_table_takes_only_runs_with_every_column(tmp_path):
    """A later run of one network that lacks some of the table's columns (one batch size at
    1 and 2 threads, say) does not replace that network's row."""
    suite_runs = [p for p in sorted(os.listdir(readme_table.RESULTS_DIR)) if "-end-to-end-" in p]
    full = next(
        os.path.join(readme_table.RESULTS_DIR, p)
        for p in reversed(suite_runs)
        if readme_table.network_of(readme_table.parse(os.path.join(readme_table.RESULTS_DIR, p)))
        == "allconv"
    )
    with open(full, encoding="utf-8") as fh:
        text = fh.read()
    (tmp_path / "a-allconv.md").write_text(text)
    old_date = readme_table.parse(full)["date"]
    partial = "\n".join(
        line
        for line in text.replace(old_date, "2099" + old_date[4:]).splitlines()
        if not line.startswith("| 2 | 64 |")
    )
    (tmp_path / "b-allconv.md").write_text(partial)
    table = readme_table.suite_table(str(tmp_path))
    assert "a-allconv.md" in table and "b-allconv.md" not in table
    (tmp_path / "c-allconv.md").write_text(text.replace(old_date, "2099" + old_date[4:]))
    assert "c-allconv.md" in readme_table.suite_table(str(tmp_path))


def test_results_file_copies_stdout(tmp_path, capsys):
    saved = results_file.start("end-to-end-reference", str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(saved.partial)]  # not read until finished
    print("# fastcnn end-to-end benchmark")
    path = saved.finish()
    print("after")
    assert capsys.readouterr().out == "# fastcnn end-to-end benchmark\nafter\n"
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert path.endswith("-end-to-end-reference.md")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.startswith("# fastcnn end-to-end benchmark\n") and "\n## Machine\n" in text
    assert "after" not in text


def test_results_files_of_one_minute_never_overwrite_each_other(tmp_path, capsys):
    """Two runs started (or finished) in the same minute keep both files: -2, -3, ..."""
    first = results_file.start("end-to-end-lenet5", str(tmp_path))
    second = results_file.start("end-to-end-lenet5", str(tmp_path))
    print("b")
    b = second.finish()
    print("a")
    a = first.finish()
    third = results_file.start("end-to-end-lenet5", str(tmp_path))
    c = third.finish()
    assert len({a, b, c}) == 3 and sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(p) for p in (a, b, c)
    )
    capsys.readouterr()
