"""Writing a layer's ``tar-split.json.gz`` and ``diff`` from a directory, as an engine records them when it
loads a layer: for the sample root (``sample.py``) and the benchmark, so the content check (``checks/layerdigest.py``)
has real layers to check. The tar is never written out: its headers and padding go into the tar-split as
segments, each regular file as its name, size and CRC-64, and the sha256 of the whole stream is the ``diff``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import zlib
from typing import Dict, Iterator, List, Tuple

import fastcrc

from migrator.formats import aufs

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
CHUNK = 1 << 20
FILE, SEGMENT = 1, 2  # entry types: a file's payload, read from the diff; raw bytes (headers, padding)


def _kept(name: str) -> bool:
    """aufs's own entries are not layer content: the aufs driver's Diff leaves out ``.wh..wh.*`` but the opaque
    marker (moby ``daemon/graphdriver/aufs``: ``ExcludePatterns: .wh..wh.*, !.wh..wh..opq``)."""
    return aufs.whiteout_kind(name) != aufs.INTERNAL


def _names(top: str) -> List[str]:
    """Every entry below ``top`` that a layer tar holds, relative, parents before children, in a stable order."""
    out: List[str] = []
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if _kept(d))
        rel = os.path.relpath(dirpath, top)
        for name in sorted(n for n in dirs + files if _kept(n)):
            out.append(name if rel == "." else os.path.join(rel, name))
    return out


def write(top: str, out_path: str) -> Tuple[str, int]:
    """Write the tar-split of the directory ``top`` to ``out_path``; return its ``diff`` (sha256:…) and its
    ``size`` (the bytes of its files, as the engine records it)."""
    sha = hashlib.sha256()
    lines: List[bytes] = []
    # only for gettarinfo and tobuf: nothing is written to it
    tar = tarfile.TarFile(fileobj=io.BytesIO(), mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                          errors="surrogateescape")
    inodes: Dict[Tuple[int, int], str] = {}
    pending = b""  # the padding after a file's data, sent with the next header
    written = payload = 0  # bytes of the stream so far; bytes of file data

    def segment(raw: bytes) -> None:
        nonlocal written
        lines.append(json.dumps({"type": 2, "payload": base64.b64encode(raw).decode(),
                                 "position": len(lines)}).encode())
        sha.update(raw)
        written += len(raw)

    try:
        for rel in _names(top):
            path = os.path.join(top, rel)
            st = os.lstat(path)
            info = tar.gettarinfo(path, rel)
            if info is None:
                continue  # a socket: tar holds none, and an engine's layer tar has none either
            key = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in inodes:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, inodes[key], 0
            elif stat.S_ISREG(st.st_mode):
                inodes[key] = rel
            segment(pending + info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            pending = b""
            if info.isreg() and info.size > 0:
                crc = _stream(path, info.size, sha)
                entry = {"type": 1, "size": info.size, "payload": base64.b64encode(crc.to_bytes(8, "big")).decode(),
                         "position": len(lines)}
                raw = os.fsencode(rel)
                try:
                    entry["name"] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    entry["name_raw"] = base64.b64encode(raw).decode()
                lines.append(json.dumps(entry).encode())
                written += info.size
                payload += info.size
                pending = bytes(-info.size % BLOCK)
    finally:
        tar.close()
    end = pending + bytes(2 * BLOCK)
    segment(end + bytes(-(written + len(end)) % RECORD))  # two zero blocks, then the tar's last record filled
    with open(out_path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(b"\n".join(lines) + b"\n")  # mtime 0: the same tree gives the same bytes
    return f"sha256:{sha.hexdigest()}", payload


def _stream(path: str, size: int, sha) -> int:
    crc = 0
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path} shrank while it was read")
            sha.update(chunk)
            crc = fastcrc.crc64.go_iso(chunk, crc)
            left -= len(chunk)
    return crc


def entries(path: str) -> Iterator[dict]:
    """The entries of a ``tar-split.json.gz``, one JSON object a line (vbatts/tar-split ``tar/storage``)."""
    with gzip.open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def stream_size(path: str) -> int:
    """Bytes the layer's tar holds (for a progress bar in bytes): read from its tar-split, 0 if unreadable."""
    total = 0
    try:
        for entry in entries(path):
            if entry.get("type") == SEGMENT:
                total += len(entry.get("payload") or "") * 3 // 4
            elif entry.get("type") == FILE:
                total += int(entry.get("size") or 0)
    except (OSError, EOFError, ValueError, zlib.error):
        return 0
    return total
