"""Just enough of R's serialization format to read character data out of an R lazy-load database.

Debian's ``r-cran-janeaustenr`` stores Austen's six novels as character vectors (one element per
line) in ``data/Rdata.rdb``, indexed by ``data/Rdata.rdx``. Reading them needs no R: the index is a
gzip'ed serialized list of (offset, length) pairs, and each record is a 4-byte big-endian length plus a
zlib stream of one serialized object. The format is R's XDR ("X\\n") serialization, versions 2 and 3;
only the node types character data is built from are understood, anything else is a clear error.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["read_rdx", "read_rdb_object", "lazy_load"]

# SEXP type codes and pseudo-types of R's serialize.c that character data can contain.
_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 254, 1, 2, 9, 10, 13, 14, 16, 19
_REF, _GLOBALENV, _EMPTYENV, _BASEENV, _MISSING = 255, 253, 242, 241, 251
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization (expected the 'X\\n' header)")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            name_length = self.int()  # then the native encoding's name
            self.pos += name_length
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            upper, lower = self.int(), self.int()
            n = (upper << 32) + lower
        return n

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind in (_NIL, _GLOBALENV, _EMPTYENV, _BASEENV, _MISSING):
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:  # pairlist: attributes, tag, value, rest
            if flags & _HAS_ATTR:
                self.item()
            tag = self.item() if flags & _HAS_TAG else None
            value = self.item()
            rest = self.item()
            return [(tag, value)] + (rest or [])
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            text = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        if kind in (_LGL, _INT):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == _REAL:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (_STR, _VEC):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R object of SEXP type {kind} is not supported by this reader")
        if flags & _HAS_ATTR:
            attributes = dict(self.item())
            # A named list (R's list(a = ..., b = ...)) becomes a dict; other attributes are dropped.
            if kind == _VEC and attributes.get("names") is not None:
                return dict(zip(attributes["names"], value))
        return value


def _unserialize(data: bytes) -> Any:
    return _Reader(data).item()


def read_rdx(path: Path) -> dict[str, tuple[int, int]]:
    """The index of a lazy-load database: variable name -> (offset, length) in the ``.rdb`` file."""
    index = _unserialize(gzip.decompress(Path(path).read_bytes()))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise ValueError(f"{path} is not an R lazy-load index (no named 'variables' list)")
    return {name: (where[0], where[1]) for name, where in index["variables"].items()}


def read_rdb_object(path: Path, offset: int, length: int) -> Any:
    """One object of a lazy-load database: 4-byte big-endian size, then a zlib stream."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        record = handle.read(length)
    return _unserialize(zlib.decompress(record[4:]))


def lazy_load(directory: Path, name: str = "Rdata") -> dict[str, Any]:
    """Every object of the lazy-load database ``directory/name.{rdx,rdb}``."""
    directory = Path(directory)
    index = read_rdx(directory / f"{name}.rdx")
    return {var: read_rdb_object(directory / f"{name}.rdb", *where) for var, where in index.items()}
