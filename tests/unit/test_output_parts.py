"""Result parts: atomic commits, exact resume, merge to Parquet or CSV."""

from __future__ import annotations

import json

import pytest

from serving.errors import InputError
from serving.output import JobStopped, PartWriter, errors_path, read_results, result_columns

COLUMNS = result_columns(("normal", "tumour"))


def _row(i: int) -> dict:
    return {"source": f"img_{i:03d}.png", "x": None, "y": None, "col": None, "row": None,
            "prob_normal": 1 - i / 100, "prob_tumour": i / 100, "predicted": "tumour" if i > 50 else "normal",
            "label": None, "tta": "none", "model": "m", "version": 1}


def _feed(writer: PartWriter, unit: str, n: int) -> None:
    for i in range(writer.done(unit), n):
        if i % 7 == 3:
            writer.add(unit, error=(f"img_{i:03d}.png", "empty file (0 bytes)"))
        else:
            writer.add(unit, row=_row(i))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_interrupted_job_resumes_without_losing_or_repeating_a_row(tmp_path, suffix):
    out = tmp_path / f"results{suffix}"
    fp = {"model": "m", "tta": "none"}
    first = PartWriter(out, COLUMNS, fingerprint=fp, part_rows=5, stop_after_parts=2)
    with pytest.raises(JobStopped):
        _feed(first, "folder:a", 30)
    assert first.done("folder:a") == 12  # 10 rows and the errors at items 3 and 10: two parts
    # A part written after the last commit point (a crash between part and manifest) is dropped.
    (first.parts_dir / f"part-00099{suffix}").write_text("half")
    second = PartWriter(out, COLUMNS, fingerprint=fp, resume=True, part_rows=5)
    assert not (second.parts_dir / f"part-00099{suffix}").exists()
    _feed(second, "folder:a", 30)
    second.finish()
    rows = read_results(out)
    expected = [i for i in range(30) if i % 7 != 3]
    assert [r["source"] for r in rows] == [f"img_{i:03d}.png" for i in expected]
    assert rows[5]["prob_tumour"] == pytest.approx(expected[5] / 100)
    errors = errors_path(out).read_text().splitlines()
    assert errors == ["source,reason"] + [f"img_{i:03d}.png,empty file (0 bytes)" for i in (3, 10, 17, 24)]
    assert not second.parts_dir.exists()


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    out = tmp_path / "results.parquet"
    w = PartWriter(out, COLUMNS, fingerprint={"model": "m", "tta": "none"}, part_rows=2)
    _feed(w, "u", 4)
    w.commit()
    with pytest.raises(InputError, match=r"--resume: .* different settings \(tta\)"):
        PartWriter(out, COLUMNS, fingerprint={"model": "m", "tta": "five"}, resume=True)


def test_manifest_is_the_commit_point_and_counts_items_per_unit(tmp_path):
    out = tmp_path / "results.csv"
    w = PartWriter(out, COLUMNS, fingerprint={}, part_rows=3)
    _feed(w, "u1", 4)
    w.add("u2", row=_row(99))
    w.commit()
    manifest = json.loads((w.parts_dir / "manifest.json").read_text())
    assert manifest["progress"] == {"u1": 4, "u2": 1}
    assert manifest["parts"] == ["part-00000.csv", "part-00001.csv"]
    assert manifest["errors"] == [["img_003.png", "empty file (0 bytes)"]]


def test_output_suffix_must_be_parquet_or_csv(tmp_path):
    with pytest.raises(InputError, match=r"--out: .*results.json must end in .parquet or .csv"):
        PartWriter(tmp_path / "results.json", COLUMNS, fingerprint={})


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_results_stream_in_batches_with_chosen_columns_and_count_from_metadata(tmp_path, suffix):
    from serving.output import count_results, iter_results

    out = tmp_path / f"results{suffix}"
    w = PartWriter(out, COLUMNS, fingerprint={}, part_rows=4)
    for i in range(23):
        w.add("u", row=_row(i))
    w.finish()
    assert count_results(out) == 23
    got = list(iter_results(out, columns=["source", "prob_tumour"], batch_rows=5))
    assert got == [{"source": f"img_{i:03d}.png", "prob_tumour": pytest.approx(i / 100)} for i in range(23)]
