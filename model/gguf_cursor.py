"""A cursor over GGUF bytes: the one parser of GGUF metadata values, shared by the tokenizer (metadata
only, from an mmap) and the weight loader (metadata and tensor infos, from a numpy memmap).

Much faster than ``gguf.GGUFReader`` for this model: that builds a numpy view for each of the ~100k
vocabulary and merge strings (~6 s); this reads them as Python values (~0.1 s).
"""

from __future__ import annotations

import struct
from typing import Any

GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


class GGUFCursor:
    """Reads little-endian GGUF values from `buf` (anything struct.unpack_from and slicing accept)."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == GGUF_STRING:
            return self.string()
        if vtype == GGUF_ARRAY:
            itype, count = self.unpack("IQ")
            if itype in GGUF_SCALARS:
                return list(self.unpack(f"{count}{GGUF_SCALARS[itype]}"))
            return [self.value(itype) for _ in range(count)]
        if vtype not in GGUF_SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.unpack(GGUF_SCALARS[vtype])[0]
