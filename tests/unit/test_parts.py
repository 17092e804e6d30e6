"""The commit protocol of both executors, without a server: parts per unit, cover, verification, the merge."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.client.identity import ServedIdentity
from serving.core.errors import JobError
from serving.inputs.datasets import Sample
from serving.inputs.items import Item
from serving.inputs.units import FailedUnit, PatchUnit, Work
from serving.jobs.config import ScoreConfig
from serving.jobs.finish import finish
from serving.jobs.fingerprint import JobFingerprint, job_path, read_job_record
from serving.jobs.output import count_results, errors_path, iter_results, read_results, result_schema
from serving.jobs.parts import PartMeta, cover, list_unit, part_path, read_meta, table_sha256, write_part
from serving.jobs.scorer import PartBuffer, UnitJob


class FakeWork(Work):
    def __init__(self, n: int, digest: str = "items-v1"):
        self.n, self.digest, self.info = n, digest, {"kind": "folder"}


def _job(tmp_path, tiny_spec, suffix=".parquet", part_rows=3) -> UnitJob:
    cfg = ScoreConfig(inputs=(str(tmp_path),), urls=("127.0.0.1:1",), model="tiny", out=str(tmp_path / f"r{suffix}"),
                      part_rows=part_rows)
    served = ServedIdentity("tiny", 1, "w" * 64, "s" * 64)
    return UnitJob(cfg, tiny_spec, "job-digest", served, "tumour")


def _row(job: UnitJob, i: int) -> dict:
    return {"source": f"img_{i:03d}.png", "slide": None, "x": None, "y": None, "col": None, "row": None,
            "prob_normal": 1 - i / 100, "prob_tumour": i / 100, "predicted": "tumour" if i > 50 else "normal",
            "label": "normal" if i % 2 else "tumour", "tta": "none", "model": "tiny", "version": 1}


def _fill(job: UnitJob, unit: int, work: Work, indices, errors=(), offset: int = 0) -> list[PartMeta]:
    """Items ``indices`` of a unit (sources numbered from ``offset``), the ones in ``errors`` unreadable."""
    committed: list[PartMeta] = []
    buf = PartBuffer(job, FailedUnit(unit, "k"), work, committed.append)
    for i in indices:
        item = Item(i, f"img_{i + offset:03d}.png")
        if i in errors:
            buf.add(item, error="empty file (0 bytes)")
        else:
            buf.add(item, row=_row(job, i + offset))
    buf.flush()
    return committed


def test_a_part_is_committed_every_part_rows_items_at_each_gap_and_on_flush(tmp_path, tiny_spec):
    job = _job(tmp_path, tiny_spec, part_rows=3)
    metas = _fill(job, 4, FakeWork(10), [0, 1, 2, 3, 6, 7, 8, 9], errors={7})
    assert [(m.start, m.stop, m.rows, m.errors) for m in metas] == [
        (0, 3, 3, ()), (3, 4, 1, ()), (6, 9, 2, (("img_007.png", "empty file (0 bytes)"),)), (9, 10, 1, ())]
    assert sorted(p.name for p in part_path(job.parts_dir, 4, 0).parent.iterdir()) == [
        "part-000000000.parquet", "part-000000003.parquet", "part-000000006.parquet", "part-000000009.parquet"]
    found = list_unit(job.parts_dir, 4, "job-digest", job.columns, verify=True)
    assert not found.bad and [m.start for _, m in found.good] == [0, 3, 6, 9]
    chosen, todo = cover(found.good, 10, "items-v1")
    assert todo == [(4, 6)] and len(chosen) == 4


def test_cover_skips_overlapping_stale_and_resized_parts():
    def meta(start, stop, n=20, digest="a"):
        return (None, PartMeta("j", 0, start, stop, n, digest, stop - start, (), ""))

    parts = [meta(0, 5), meta(3, 8), meta(5, 10), meta(12, 20), meta(10, 12, digest="b"), meta(10, 11, n=30)]
    chosen, todo = cover(parts, 20, "a")
    assert [(m.start, m.stop) for _, m in chosen] == [(0, 5), (5, 10), (12, 20)]
    assert todo == [(10, 12)]
    assert cover([], 7)[1] == [(0, 7)]


def test_a_part_is_published_once_and_its_checksum_survives_the_round_trip(tmp_path, tiny_spec):
    job = _job(tmp_path, tiny_spec)
    table = pa.Table.from_pylist([_row(job, i) for i in range(5)], schema=result_schema(job.columns))
    meta = PartMeta("job-digest", 0, 0, 5, 5, "d", 5, (), table_sha256(table))
    assert write_part(job.parts_dir, meta, table) is True
    other = pa.Table.from_pylist([_row(job, i + 1) for i in range(5)], schema=result_schema(job.columns))
    assert write_part(job.parts_dir, meta, other) is False  # a twin's commit never replaces the first
    path = part_path(job.parts_dir, 0, 0)
    assert read_meta(path) == meta
    back = pq.read_table(path)
    assert table_sha256(back) == meta.sha256 and back.column("source").to_pylist()[0] == "img_000.png"
    assert table_sha256(other) != meta.sha256


def test_truncated_damaged_and_foreign_parts_are_bad_and_never_covered(tmp_path, tiny_spec):
    job = _job(tmp_path, tiny_spec, part_rows=2)
    _fill(job, 0, FakeWork(8), range(8))
    paths = sorted(part_path(job.parts_dir, 0, 0).parent.iterdir())
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # truncated after its commit
    # Damaged in a way Parquet still reads: the same metadata over other rows.
    meta1 = read_meta(paths[1])
    wrong = pa.Table.from_pylist([_row(job, 90), _row(job, 91)], schema=result_schema(job.columns))
    pq.write_table(wrong.replace_schema_metadata({b"patchserve.part": meta1.to_json()}), paths[1])
    foreign = read_meta(paths[2])
    table = pq.read_table(paths[2])
    pq.write_table(table.replace_schema_metadata({b"patchserve.part": PartMeta(
        "another-job", 0, foreign.start, foreign.stop, 8, foreign.unit_digest, 2, (), foreign.sha256).to_json()}),
        paths[2])
    found = list_unit(job.parts_dir, 0, "job-digest", job.columns, verify=True)
    assert [(p.name, why.split(" ")[0]) for p, why in found.bad] == [
        ("part-000000000.parquet", "unreadable"), ("part-000000002.parquet", "damaged"),
        ("part-000000004.parquet", "written")]
    assert cover(found.good, 8, "items-v1")[1] == [(0, 6)]
    # Without verify only what the footer says is checked: the damaged rows would pass.
    assert len(list_unit(job.parts_dir, 0, "job-digest", job.columns, verify=False).good) == 2


def _units(tmp_path) -> tuple:
    samples = tuple(Sample(str(tmp_path / f"img_{i:03d}.png"), 0) for i in range(8))
    return (PatchUnit(0, "folder:x", "folder", samples[:4], ("normal", "tumour")),
            FailedUnit(1, "bad-rows:x", (("m.csv:3", "malformed manifest row: empty path"),)),
            PatchUnit(2, "folder:x", "folder", samples[4:], ("normal", "tumour")))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_finish_merges_the_units_in_plan_order_with_their_errors_and_drops_the_parts(tmp_path, tiny_spec, suffix):
    job = _job(tmp_path, tiny_spec, suffix)
    units = _units(tmp_path)
    _fill(job, 2, FakeWork(4), range(4), errors={1}, offset=4)  # committed first: order comes from the plan
    _fill(job, 1, FakeWork(1), [0], errors={0})
    _fill(job, 0, FakeWork(4), range(4))
    fp = JobFingerprint.build(job.served, job.cfg.options(), ["a\t1\t2"])
    logs: list[str] = []
    result = finish(job, units, [], fp, ["a\t1\t2"], 8, 1.0, logs.append)
    rows = read_results(job.out)
    assert [r["source"] for r in rows] == [f"img_{i:03d}.png" for i in (0, 1, 2, 3, 4, 6, 7)]
    assert rows[4]["prob_tumour"] == pytest.approx(0.04) and rows[4]["x"] is None and rows[4]["slide"] is None
    assert errors_path(job.out).read_text().splitlines() == [
        "source,reason", "img_000.png,empty file (0 bytes)", "img_005.png,empty file (0 bytes)"]
    assert (result.rows, result.errors) == (7, 2) and count_results(job.out) == 7
    assert not job.parts_dir.exists()
    assert result.metrics["num_samples"] == 7  # the labelled units' rows
    assert read_job_record(job.out)[0] == fp and json.loads(job_path(job.out).read_text())["slides"] == []
    assert logs[-1] == f"2 inputs recorded as errors, listed in {errors_path(job.out)}"
    got = list(iter_results(job.out, columns=["source", "prob_tumour"], batch_rows=3))
    assert got[-1] == {"source": "img_007.png", "prob_tumour": pytest.approx(0.07)}


def test_a_unit_with_uncommitted_items_stops_the_finish_naming_it(tmp_path, tiny_spec):
    job = _job(tmp_path, tiny_spec)
    units = _units(tmp_path)
    _fill(job, 0, FakeWork(4), range(4))
    _fill(job, 1, FakeWork(1), [0], errors={0})
    _fill(job, 2, FakeWork(4), [0, 1], offset=4)
    fp = JobFingerprint.build(job.served, job.cfg.options(), [])
    with pytest.raises(JobError, match=r"unit 2 \(folder:x\) has items 2..3 uncommitted; run the same command "
                                       "with --resume"):
        finish(job, units, [], fp, [], 0, 1.0, lambda _m: None)
    assert not job.out.exists()
