"""`cascade data split --runner beam`: the Beam pipeline writes the rows `protocols.write_split`
writes for user-temporal (ties in time, the loader's truncation of timestamps, its threshold, blank
lines and CRLF), refuses what the loader refuses, and never leaves partial output."""

from __future__ import annotations

import logging

import pytest
from apache_beam.io import source_test_utils

from serving import cli
from towers import beam_split, data, protocols

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
# File lines 2-13 (line 5 blank). Under the card's threshold 3, line 3 drops (else u1's newest).
# Ties: u1 at 30 (lines 6, 8), u2 at 50 (4, 11), u3 at 20.9 / 20.2 (7, 9), which the loader
# truncates to 20. u4 and u5 have one row each, which they keep for training; u5's rating is 3 in
# float32, as the loader compares, and under 3 in float64.
LINES = ["u1\ti1\t4\t10", "u1\ti2\t2\t40", "u2\ti1\t5\t50", "", "u1\ti3\t5\t30", "u3\ti2\t4\t20.9",
         "u1\ti4\t3\t30", "u3\ti3\t4\t20.2", "u4\ti1\t5\t70", "u2\ti5\t4\t50", "u2\ti4\t4\t60",
         "u5\ti2\t2.99999999\t80"]


def _source(folder, lines=LINES):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "p.inter").write_bytes(("\r\n".join([HEADER, *lines]) + "\r\n").encode())
    (folder / "p.yaml").write_text("positive_threshold: 3\n")
    (folder / "p.item").write_text("item_id:token\tname:token\n" + "".join(
        f"i{n}\tx{n}\n" for n in range(1, 6)))
    return folder


def _files(folder) -> dict[str, list[bytes]]:
    """Each file's lines, sorted: the Beam output may order lines differently."""
    return {p.name: sorted(p.read_bytes().splitlines(keepends=True)) for p in folder.iterdir()}


def _rows(split_part: data.Interactions) -> list[tuple]:
    return sorted(zip(split_part.user_id, split_part.item_id, split_part.rating.tolist(),
                      split_part.timestamp.tolist()))


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_the_beam_split_is_write_split(tmp_path, share):
    """Share 0.25 cuts inside u1's and u3's ties, 0.5 inside u2's: a tie broken by anything but
    file position, timestamps compared before truncation, or the threshold ignored would move a
    row between the files."""
    source = _source(tmp_path / "source")
    dataset = data.load(source)
    expected = protocols.write_split(dataset, dataset.split("user-temporal", test_share=share),
                                     tmp_path / "local")
    out, train, test = beam_split.write_split(source, tmp_path / "beam", test_share=share)
    assert _files(out) == _files(expected)
    assert sorted(p.name for p in out.iterdir()) == ["p.item", "p.test.inter", "p.train.inter",
                                                     "p.yaml"]
    again, local = data.load(out).split(), data.load(expected).split()
    assert again.protocol == "pre-split" and (len(again.train), len(again.test)) == (train, test)
    assert _rows(again.train) == _rows(local.train) and _rows(again.test) == _rows(local.test)


def test_the_cli_splits_movielens_on_beam(tiny_data_dir, tmp_path):
    """3,000 MovieLens rows with their item, user and card files, Beam flags after `--`."""
    assert cli.main(["data", "split", "--data", str(tiny_data_dir), "--out", str(tmp_path / "beam"),
                     "--split", "user-temporal", "--runner", "beam", "--",
                     "--direct_num_workers", "1"]) == 0
    dataset = data.load(tiny_data_dir)
    expected = protocols.write_split(dataset, dataset.split("user-temporal"), tmp_path / "local")
    assert _files(tmp_path / "beam") == _files(expected)


def test_the_cli_names_the_protocols_beam_runs(tiny_data_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert cli.main(["data", "split", "--data", str(tiny_data_dir), "--out", str(tmp_path),
                         "--split", "temporal", "--runner", "beam"]) == 1
    assert "--runner beam supports --split user-temporal" in caplog.text


def test_byte_ranges_read_every_line_once(tmp_path):
    """Split into 7-byte bundles (and at every fraction), the source reads the lines the whole
    file gives, each with its byte offset: a line at a range boundary lost or read twice fails."""
    path = tmp_path / "p.inter"
    payload = ("\r\n".join([HEADER, *LINES]) + "\nlast line without newline").encode()
    path.write_bytes(payload)
    source = beam_split.OffsetLines(str(path))
    records = source_test_utils.read_from_source(source)
    assert [line for _, line in records] == payload.splitlines(keepends=True)[1:]
    assert all(payload[offset:offset + len(line)] == line for offset, line in records)
    bundles = [(b.source, b.start_position, b.stop_position)
               for b in source.split(desired_bundle_size=7)]
    assert len(bundles) > 10
    source_test_utils.assert_sources_equal_reference_source((source, None, None), bundles)
    whole = next(iter(source.split(desired_bundle_size=len(payload)))).source
    source_test_utils.assert_split_at_fraction_exhaustive(whole)


def test_a_rejected_row_fails_with_the_loaders_error_and_keeps_out(tmp_path):
    """A rating that is not a number on file line 9 (after a blank line and CRLF ends): the
    error is the loader's, file and line included, and the previous output stays as it was."""
    lines = list(LINES)
    lines[7] = "u3\ti3\tmany\t20"
    source = _source(tmp_path / "source", lines)
    with pytest.raises(data.DataError) as loaded:
        data.load(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    with pytest.raises(data.DataError) as split:
        beam_split.write_split(source, out, test_share=0.5)
    assert str(loaded.value) in str(split.value) and "p.inter:9:" in str(split.value)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    assert _files(out) == {"previous.txt": [b"kept"]}


def test_a_failing_pipeline_keeps_out(tmp_path, monkeypatch):
    def broken(self, element):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(beam_split.SplitUser, "process", broken)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    with pytest.raises(Exception, match="worker lost"):
        beam_split.write_split(_source(tmp_path / "source"), out, test_share=0.5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert _files(out) == {"previous.txt": [b"kept"]}


def test_refusals(tmp_path):
    source = _source(tmp_path / "source")
    with pytest.raises(data.DataError, match="another folder than the dataset's own"):
        beam_split.write_split(source, tmp_path, test_share=0.5)  # would replace the source too
    (tmp_path / "timeless").mkdir()
    (tmp_path / "timeless" / "p.inter").write_text("user_id:token\titem_id:token\nu1\ti1\n")
    with pytest.raises(data.DataError, match="needs a timestamp field"):
        beam_split.write_split(tmp_path / "timeless", tmp_path / "out")
    singles = _source(tmp_path / "singles", [LINES[i] for i in (0, 2, 5, 8)])  # a row per user
    with pytest.raises(data.DataError) as local:
        data.load(singles).split("user-temporal")
    with pytest.raises(data.DataError, match="leaves 4 training and 0 test rows") as beam:
        beam_split.write_split(singles, tmp_path / "out")
    assert str(beam.value) == str(local.value)
    assert not (tmp_path / "out").exists()
