"""The content check: each image layer's bytes against its content address (its digest), with no engine running.

An image layer's ``diff`` (``image/<driver>/layerdb/sha256/<chain>/diff``) is the sha256 of the layer's
uncompressed tar, the stream ``docker save`` and ``docker push`` produce. The engine does not keep that tar: it
rebuilds it from ``tar-split.json.gz`` and the files of the layer's diff directory, read by name (moby
``layer/layer_store.go`` ``assembleTarTo``, vbatts/tar-split ``tar/asm``). Doing the same here, streamed,
proves byte for byte that the engine will serve the same layer; it works on either driver's tree, before and
after ``cleanup``.

tar-split, one JSON object a line (``tar/storage/entry.go``)::

    {"type": 2, "payload": "<base64 raw bytes>", "position": N}          a segment: headers, padding, verbatim
    {"type": 1, "name": "etc/passwd", "size": 1234,                      a file's payload, read from the diff
     "payload": "<base64 CRC-64/ISO, 8 bytes big-endian>", "position": N}  ("name_raw": base64 bytes if not UTF-8)

Only files with ``size`` > 0 are read (whiteouts, hardlinks and directories carry no payload). Every file's
CRC-64 is checked on the way, so a layer whose digest is wrong names the files that differ (missing, changed,
wrong size) in the same pass; the stream stays aligned to the tar-split whatever a file holds (a short file is
padded with zeros, a long one read to its recorded size), so one damaged file does not hide the next.
Holes of sparse files are fed as zeros without being read. Nothing here writes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import zlib
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import fastcrc

from migrator.formats import images, tarsplit

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)


@dataclass
class LayerDigest:
    """What the check found for one image layer."""

    chain_id: str
    cache_id: str
    diff_id: str
    status: str = "ok"  # ok, failed, unverifiable
    bytes: int = 0
    digest: str = ""
    reason: str = ""
    files: List[Tuple[str, str, str]] = field(default_factory=list)  # (missing|changed|wrong-size|unreadable, path,
    #                                                                   detail)

    def summary(self) -> dict:
        return {"chain_id": self.chain_id, "cache_id": self.cache_id, "diff_id": self.diff_id,
                "status": self.status, "bytes": self.bytes, "digest": self.digest, "reason": self.reason,
                "files": [{"kind": k, "path": p, "detail": d} for k, p, d in self.files]}


class _Opener:
    """Opens files below a diff directory by their tar name, never following a symlink; keeps the descriptor of
    the last directory it walked (tar order puts a directory's files together)."""

    def __init__(self, top_fd: int) -> None:
        self.top_fd = top_fd
        self.dir_key = b""  # the parent path of the last file opened, as the tar names it
        self.dir_fd = top_fd

    def open(self, name: bytes) -> int:
        parent, _, leaf = name.rpartition(b"/")
        if parent != self.dir_key or not leaf or leaf in (b".", b".."):
            parts = [p for p in name.split(b"/") if p not in (b"", b".")]
            if not parts or b".." in parts:
                raise FileNotFoundError(f"not a path below the layer: {name!r}")
            self._walk(parts[:-1])
            self.dir_key, leaf = parent, parts[-1]
        return os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.dir_fd)

    def _walk(self, parts: List[bytes]) -> None:
        self.close()
        fd = self.top_fd
        try:
            for part in parts:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                if fd != self.top_fd:
                    os.close(fd)
                fd = nfd
        except OSError:
            if fd != self.top_fd:
                os.close(fd)
            raise
        self.dir_fd = fd

    def close(self) -> None:
        if self.dir_fd != self.top_fd:
            os.close(self.dir_fd)
        self.dir_key, self.dir_fd = None, self.top_fd


class _Stream:
    """The layer's tar stream as it is hashed: the sha256, one read buffer for every file, the bytes so far."""

    def __init__(self, advance: Callable[[int], None]) -> None:
        self.sha = hashlib.sha256()
        self.view = memoryview(bytearray(CHUNK))
        self.advance = advance

    def zeros(self, n: int, crc: int) -> int:
        """``n`` zero bytes into the stream (a hole, or what a short or missing file lacks); the CRC after them."""
        while n > 0:
            k = min(CHUNK, n)
            self.sha.update(_ZEROS[:k])
            crc = fastcrc.crc64.go_iso(_ZEROS[:k], crc)
            self.advance(k)
            n -= k
        return crc

    def file(self, fd: int, st: os.stat_result, size: int) -> int:
        """``size`` bytes of the file into the stream (zeros past its end); its CRC-64."""
        if st.st_blocks * 512 >= min(size, st.st_size):  # no holes: read straight through
            return self._read(fd, 0, size, 0, size)
        crc, offset = 0, 0
        while offset < size:
            try:
                data_at = min(os.lseek(fd, offset, os.SEEK_DATA), size)
            except OSError:  # ENXIO: only a hole (or nothing) is left
                data_at = size
            crc = self.zeros(data_at - offset, crc)
            offset = data_at
            if offset < size:
                try:
                    hole_at = min(os.lseek(fd, offset, os.SEEK_HOLE), size)
                except OSError:
                    hole_at = size
                crc = self._read(fd, offset, hole_at, crc, size)
                offset = hole_at
        return crc

    def _read(self, fd: int, offset: int, end: int, crc: int, size: int) -> int:
        """Bytes ``offset``..``end`` of the file; zeros for what it lacks of them."""
        view = self.view
        while offset < end:
            n = os.preadv(fd, [view[:min(CHUNK, end - offset)]], offset)
            if n == 0:
                return self.zeros(end - offset, crc)
            chunk = view[:n]
            self.sha.update(chunk)
            crc = fastcrc.crc64.go_iso(chunk, crc)
            offset += n
            self.advance(n)
        return crc


def check_layer(layer: images.ImageLayer, diff_dir: str,
                advance: Callable[[int], None] = lambda n: None) -> LayerDigest:
    """Reassemble ``layer``'s tar from its tar-split and ``diff_dir``; check its sha256 against ``diff``."""
    result = LayerDigest(layer.chain_id, layer.cache_id, layer.diff_id)
    if not os.path.lexists(layer.tar_split):
        result.status = "unverifiable"
        result.reason = f"no {images.TAR_SPLIT} (the engine cannot save or push it either)"
        return result
    if not layer.diff_id.startswith("sha256:"):
        result.status, result.reason = "failed", f"its diff is {layer.diff_id!r}, not a sha256 digest"
        return result
    try:
        top = os.open(diff_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        result.status, result.reason = "failed", f"its layer directory {diff_dir} cannot be opened ({exc.strerror})"
        return result
    stream = _Stream(advance)
    opener = _Opener(top)
    b64decode = binascii.a2b_base64  # accepts the str json gives, without base64.b64decode's checks
    try:
        for entry in tarsplit.entries(layer.tar_split):
            kind = entry.get("type")
            if kind == tarsplit.SEGMENT:
                raw = b64decode(entry.get("payload") or b"")
                stream.sha.update(raw)
                result.bytes += len(raw)
                advance(len(raw))
            elif kind == tarsplit.FILE and entry.get("size", 0) > 0:
                _check_file(entry, opener, stream, result)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        result.status, result.reason = "failed", f"{images.TAR_SPLIT} is unreadable ({exc})"
        return result
    finally:
        opener.close()
        os.close(top)
    result.digest = f"sha256:{stream.sha.hexdigest()}"
    if result.digest != layer.diff_id:
        result.status = "failed"
        result.reason = (f"reassembled to {result.digest}, not {layer.diff_id}" if result.files else
                        f"reassembled to {result.digest}, not {layer.diff_id}, with every file as recorded: the "
                        f"{images.TAR_SPLIT} itself is damaged")
    elif result.files:  # the digest holds although a file differs from its CRC: only a damaged tar-split does that
        result.status, result.reason = "failed", f"the digest holds but {images.TAR_SPLIT}'s checksums do not"
    return result


def _check_file(entry: dict, opener: _Opener, stream: _Stream, result: LayerDigest) -> None:
    raw_name = entry.get("name_raw")
    name = base64.b64decode(raw_name) if raw_name else entry["name"].encode("utf-8", "surrogateescape")
    size = int(entry["size"])
    result.bytes += size
    try:
        fd = opener.open(name)
    except OSError as exc:
        stream.zeros(size, 0)
        result.files.append(("missing", _shown(name), exc.strerror or str(exc)))
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            stream.zeros(size, 0)
            result.files.append(("missing", _shown(name), "not a regular file"))
            return
        crc = stream.file(fd, st, size)
    except OSError as exc:
        result.files.append(("unreadable", _shown(name), exc.strerror or str(exc)))
        return
    finally:
        os.close(fd)
    if st.st_size != size:
        result.files.append(("wrong-size", _shown(name), f"{st.st_size} bytes, recorded {size}"))
    elif crc != int.from_bytes(base64.b64decode(entry.get("payload") or b""), "big"):
        result.files.append(("changed", _shown(name), "its bytes differ from the recorded checksum"))


def _shown(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def expected_work(layer: images.ImageLayer) -> Tuple[int, int]:
    """(bytes, a cost estimate) of proving ``layer``, without reading its tar-split: the bytes its layer store
    entry records (``size``: what its files hold), and a cost that also counts its entries (each costs about
    what hashing 36 KiB does; the compressed tar-split holds about 150 bytes an entry). For the order of the
    work, largest first, and the total of a progress bar."""
    recorded = layer.size
    if recorded <= 0:
        recorded = tarsplit.stream_size(layer.tar_split)
    try:
        split = os.path.getsize(layer.tar_split)
    except OSError:
        split = 0
    return recorded, recorded + 250 * split
