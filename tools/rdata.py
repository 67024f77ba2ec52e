"""Minimal reader for R's XDR serialization and lazy-load databases (.rdx/.rdb).

Only what the corpus builder needs: character/integer/real/logical vectors, lists,
pairlists, symbols and attributes. Used to read the Jane Austen novels that Debian's
r-cran-janeaustenr ships as R data, without R.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

NILVALUE, REF, GLOBALENV, EMPTYENV, BASEENV, ALTREP = 254, 255, 253, 242, 241, 238
SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 1, 2, 9, 10, 13, 14, 16, 19


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def bytes(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def header(self) -> None:
        assert self.bytes(2) == b"X\n", "only XDR serialization is supported"
        version = self.int()
        self.int(), self.int()
        if version == 3:
            self.bytes(self.int())

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if typ in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV):
            return None
        if typ == REF:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if typ == SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if typ == CHAR:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8", "replace")
        if typ == LIST:
            out: dict[Any, Any] = {}
            items = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                value = self.item()
                items.append((tag, value))
                flags = self.int()
                typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if typ != LIST:
                    self.pos -= 4
                    self.item()
                    break
            for tag, value in items:
                out[tag] = value
            return out
        if typ == ALTREP:
            self.item(), self.item(), self.item()
            return None
        if typ in (LGL, INT):
            n = self.length()
            value: Any = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif typ == REAL:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif typ in (STR, VEC):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R type {typ}")
        attrs = self.item() if has_attr else None
        if attrs and typ == VEC and "names" in attrs:
            return dict(zip(attrs["names"], value))
        return value


def unserialize(data: bytes) -> Any:
    """Decode one R object serialized in XDR format."""
    r = _Reader(data)
    r.header()
    return r.item()


def read_lazyload(prefix: str | Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (`prefix.rdx` + `prefix.rdb`)."""
    prefix = Path(prefix)
    index = unserialize(gzip.decompress(prefix.with_suffix(".rdx").read_bytes()))
    blob = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, size) in index["variables"].items():
        chunk = blob[offset : offset + size]
        out[name] = unserialize(zlib.decompress(chunk[4:]))
    return out
