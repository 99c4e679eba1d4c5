"""`cascade data fetch`: the wheel path with checksums, GroupLens zips, atomic writes."""

from __future__ import annotations

import zipfile

import pytest

from towers import data, fetch


def _fake_wheel(tmp_path, movielens_dir, corrupt: str | None = None):
    """A wheel-shaped zip holding RecBole's three files, one of them altered if `corrupt`."""
    wheel = tmp_path / "cache" / "wheels" / "recbole-1.2.1-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in fetch.RECBOLE_FILES:
            payload = (movielens_dir / name).read_bytes()
            if name == corrupt:
                payload = payload.replace(b"\t5\t", b"\t4\t", 1)
            archive.writestr(fetch.RECBOLE_DIR + name, payload)
    return wheel


def test_wheel_extract_is_verified_and_idempotent(tmp_path, movielens_dir, monkeypatch):
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "cache"))
    _fake_wheel(tmp_path, movielens_dir)  # cached: no registry access needed
    out = fetch.fetch_movielens_100k(tmp_path / "ml")
    assert sorted(p.name for p in out.iterdir()) == sorted(fetch.RECBOLE_FILES)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fetch.fetch_movielens_100k(out)  # second run: verified files are left alone
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_checksum_mismatch_fails_and_keeps_existing_files(tmp_path, movielens_dir, monkeypatch):
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "cache"))
    _fake_wheel(tmp_path, movielens_dir, corrupt="ml-100k.inter")
    out = tmp_path / "ml"
    out.mkdir()
    (out / "ml-100k.inter").write_text("earlier content\n")
    with pytest.raises(fetch.ChecksumError, match=r"ml-100k.inter: SHA-256 mismatch, expected 4edb74e2"):
        fetch.fetch_movielens_100k(out)
    assert (out / "ml-100k.inter").read_text() == "earlier content\n"
    assert [p.name for p in out.iterdir()] == ["ml-100k.inter"]


def test_grouplens_zip_source(tmp_path, movielens):
    from tests.towers.test_data import _write_grouplens

    folder = tmp_path / "grouplens"
    folder.mkdir()
    _write_grouplens(movielens, folder)
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in fetch.GROUPLENS_FILES:
            z.write(folder / name, f"ml-100k/{name}")
    out = fetch.fetch_movielens_100k(tmp_path / "out", source=archive)
    loaded = data.load_movielens(out)
    assert len(loaded.ratings) == 100_000 and loaded.items == movielens.items


def test_bad_sources_are_named(tmp_path):
    not_a_zip = tmp_path / "ml-100k.zip"
    not_a_zip.write_text("hello")
    with pytest.raises(data.DataError, match="not a zip file"):
        fetch.fetch_movielens_100k(tmp_path / "out", source=not_a_zip)
    with pytest.raises(data.DataError, match="missing GroupLens file"):
        fetch.fetch_movielens_100k(tmp_path / "out", source=tmp_path)
    truncated = tmp_path / "small"
    truncated.mkdir()
    for name in fetch.GROUPLENS_FILES:
        (truncated / name).write_text("")
    (truncated / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||x|" + "|".join("0" * 19) + "\n")
    (truncated / "u.user").write_text("1|24|M|technician|85711\n")
    (truncated / "u.data").write_text("1\t1\t5\t874965758\n")
    with pytest.raises(data.DataError, match="expected MovieLens-100K with"):
        fetch.fetch_movielens_100k(tmp_path / "out2", source=truncated)
    assert not (tmp_path / "out2" / "u.data").exists()
