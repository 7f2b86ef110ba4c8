"""The little of ELF the verbs tracer needs: load segments (to turn a file offset into the virtual
address BCC's attach_uprobe(addr=) expects) and the GNU build-id (to recognise a provider library
across processes, containers and paths). ELF64 little-endian only (x86-64, arm64)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD, PT_NOTE = 1, 4
NT_GNU_BUILD_ID = 3


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


@dataclass(frozen=True)
class ElfInfo:
    loads: tuple[Segment, ...]
    build_id: str | None

    def vaddr_of_offset(self, file_offset: int) -> int:
        for s in self.loads:
            if s.offset <= file_offset < s.offset + s.filesz:
                return file_offset - s.offset + s.vaddr
        raise ElfError(f"file offset 0x{file_offset:x} is in no PT_LOAD segment")


def read_elf(path: str) -> ElfInfo:
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF":
            raise ElfError(f"{path}: not an ELF file")
        if ident[4] != 2 or ident[5] != 1:
            raise ElfError(f"{path}: only ELF64 little-endian is supported")
        phoff, = struct.unpack_from("<Q", ident, 32)
        phentsize, phnum = struct.unpack_from("<HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        loads, notes = [], []
        for i in range(phnum):
            p_type, _flags, off, vaddr, _paddr, filesz, _memsz, _align = struct.unpack_from(
                "<IIQQQQQQ", table, i * phentsize)
            if p_type == PT_LOAD:
                loads.append(Segment(off, vaddr, filesz))
            elif p_type == PT_NOTE:
                notes.append((off, filesz))
        build_id = None
        for off, size in notes:
            f.seek(off)
            build_id = _build_id(f.read(size))
            if build_id:
                break
    return ElfInfo(tuple(loads), build_id)


def _build_id(data: bytes) -> str | None:
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_end = pos + 12 + ((namesz + 3) & ~3)
        desc = data[name_end:name_end + descsz]
        if ntype == NT_GNU_BUILD_ID and data[pos + 12:pos + 12 + namesz].rstrip(b"\0") == b"GNU":
            return desc.hex()
        pos = name_end + ((descsz + 3) & ~3)
    return None
