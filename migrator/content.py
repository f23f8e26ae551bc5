"""The content proof: each image layer's bytes checked against its content address, with no engine running.

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
import gzip
import hashlib
import json
import os
import stat
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Tuple

import fastcrc

TAR_SPLIT = "tar-split.json.gz"
CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
_FILE, _SEGMENT = 1, 2
REMOVING = "-removing"


@dataclass
class ImageLayer:
    """One entry of the layer store: its chain id, the driver's layer id (``cache-id``) and its ``diff``."""

    chain_id: str
    cache_id: str
    diff_id: str
    tar_split: str  # path of tar-split.json.gz (may not exist)


@dataclass
class LayerProof:
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


def _read_small(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode("ascii").strip()
    finally:
        os.close(fd)


def image_layers(image_dir: str) -> List[ImageLayer]:
    """Every layer of ``image_dir/layerdb/sha256/`` (entries being removed left out), by chain id."""
    base = os.path.join(image_dir, "layerdb", "sha256")
    try:
        names = sorted(os.listdir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    layers = []
    for chain in names:
        if chain.endswith(REMOVING):
            continue
        entry = os.path.join(base, chain)
        try:
            cache_id, diff_id = _read_small(os.path.join(entry, "cache-id")), _read_small(os.path.join(entry, "diff"))
        except (OSError, UnicodeDecodeError):
            cache_id, diff_id = "", ""
        layers.append(ImageLayer(f"sha256:{chain}", cache_id, diff_id, os.path.join(entry, TAR_SPLIT)))
    return layers


def _entries(path: str) -> Iterator[dict]:
    with gzip.open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class _Opener:
    """Opens files below a diff directory by their tar name, never following a symlink; keeps the descriptor of
    the last directory it walked (tar order puts a directory's files together)."""

    def __init__(self, top_fd: int) -> None:
        self.top_fd = top_fd
        self.dir_parts: Tuple[bytes, ...] = ()
        self.dir_fd = top_fd

    def open(self, name: bytes) -> int:
        parts = tuple(p for p in name.split(b"/") if p not in (b"", b"."))
        if not parts or b".." in parts:
            raise FileNotFoundError(f"not a path below the layer: {name!r}")
        if parts[:-1] != self.dir_parts:
            self._close_dir()
            fd = self.top_fd
            try:
                for part in parts[:-1]:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    if fd != self.top_fd:
                        os.close(fd)
                    fd = nfd
            except OSError:
                if fd != self.top_fd:
                    os.close(fd)
                raise
            self.dir_parts, self.dir_fd = parts[:-1], fd
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.dir_fd)

    def _close_dir(self) -> None:
        if self.dir_fd != self.top_fd:
            os.close(self.dir_fd)
        self.dir_parts, self.dir_fd = (), self.top_fd

    def close(self) -> None:
        self._close_dir()


def _stream_file(fd: int, size: int, sha, advance: Callable[[int], None]) -> Tuple[int, int]:
    """Feed ``size`` bytes of ``fd`` (zeros past its end) to ``sha``; return (its CRC-64, its actual size)."""
    actual = os.fstat(fd).st_size
    crc = 0
    offset = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while offset < size:
        try:
            data_at = os.lseek(fd, offset, os.SEEK_DATA) if offset < actual else size
        except OSError:  # ENXIO: no data past offset (a hole to the end); EINVAL: no SEEK_DATA here
            data_at = actual if offset < actual else size
        data_at = min(data_at, size)
        while offset < data_at:  # a hole (or past the end of a short file): zeros, not read
            n = min(CHUNK, data_at - offset)
            sha.update(_ZEROS[:n])
            crc = fastcrc.crc64.go_iso(_ZEROS[:n], crc)
            offset += n
            advance(n)
        if offset >= size:
            break
        n = os.preadv(fd, [view[:min(CHUNK, size - offset)]], offset)
        if n == 0:  # the file ended: the rest is zeros
            actual = min(actual, offset)
            continue
        chunk = view[:n]
        sha.update(chunk)
        crc = fastcrc.crc64.go_iso(chunk, crc)
        offset += n
        advance(n)
    return crc, actual


def prove_layer(layer: ImageLayer, diff_dir: str, advance: Callable[[int], None] = lambda n: None) -> LayerProof:
    """Reassemble ``layer``'s tar from its tar-split and ``diff_dir``; check its sha256 against ``diff``."""
    proof = LayerProof(layer.chain_id, layer.cache_id, layer.diff_id)
    if not os.path.lexists(layer.tar_split):
        proof.status, proof.reason = "unverifiable", f"no {TAR_SPLIT} (the engine cannot save or push it either)"
        return proof
    if not layer.diff_id.startswith("sha256:"):
        proof.status, proof.reason = "failed", f"its diff is {layer.diff_id!r}, not a sha256 digest"
        return proof
    try:
        top = os.open(diff_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        proof.status, proof.reason = "failed", f"its layer directory {diff_dir} cannot be opened ({exc.strerror})"
        return proof
    sha = hashlib.sha256()
    opener = _Opener(top)
    try:
        for entry in _entries(layer.tar_split):
            if entry.get("type") == _SEGMENT:
                raw = base64.b64decode(entry.get("payload") or b"")
                sha.update(raw)
                proof.bytes += len(raw)
                advance(len(raw))
            elif entry.get("type") == _FILE and entry.get("size", 0) > 0:
                _check_file(entry, opener, sha, proof, advance)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        proof.status, proof.reason = "failed", f"{TAR_SPLIT} is unreadable ({exc})"
        return proof
    finally:
        opener.close()
        os.close(top)
    proof.digest = f"sha256:{sha.hexdigest()}"
    if proof.digest != layer.diff_id:
        proof.status = "failed"
        proof.reason = (f"reassembled to {proof.digest}, not {layer.diff_id}" if proof.files else
                        f"reassembled to {proof.digest}, not {layer.diff_id}, with every file as recorded: the "
                        f"{TAR_SPLIT} itself is damaged")
    elif proof.files:  # the digest holds although a file differs from its CRC: only a damaged tar-split does that
        proof.status, proof.reason = "failed", f"the digest holds but {TAR_SPLIT}'s checksums do not"
    return proof


def _check_file(entry: dict, opener: _Opener, sha, proof: LayerProof, advance: Callable[[int], None]) -> None:
    name = base64.b64decode(entry["name_raw"]) if entry.get("name_raw") else entry["name"].encode("utf-8",
                                                                                                  "surrogateescape")
    size = int(entry["size"])
    shown = name.decode("utf-8", "backslashreplace")
    expected = int.from_bytes(base64.b64decode(entry.get("payload") or b""), "big")
    proof.bytes += size
    try:
        fd = opener.open(name)
    except OSError as exc:
        _pad(size, sha, advance)
        proof.files.append(("missing", shown, exc.strerror or str(exc)))
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _pad(size, sha, advance)
            proof.files.append(("missing", shown, "not a regular file"))
            return
        crc, actual = _stream_file(fd, size, sha, advance)
    except OSError as exc:
        proof.files.append(("unreadable", shown, exc.strerror or str(exc)))
        return
    finally:
        os.close(fd)
    if actual != size:
        proof.files.append(("wrong-size", shown, f"{actual} bytes, recorded {size}"))
    elif crc != expected:
        proof.files.append(("changed", shown, "its bytes differ from the recorded checksum"))


def _pad(size: int, sha, advance: Callable[[int], None]) -> None:
    while size > 0:
        n = min(CHUNK, size)
        sha.update(_ZEROS[:n])
        advance(n)
        size -= n


def stream_size(layer: ImageLayer) -> int:
    """Bytes the layer's tar holds (for a progress bar in bytes): read from its tar-split, 0 if unreadable."""
    total = 0
    try:
        for entry in _entries(layer.tar_split):
            if entry.get("type") == _SEGMENT:
                total += len(entry.get("payload") or "") * 3 // 4
            elif entry.get("type") == _FILE:
                total += int(entry.get("size") or 0)
    except (OSError, EOFError, ValueError, zlib.error):
        return 0
    return total


def _prove_in_worker(layer: ImageLayer, diff_dir: str) -> LayerProof:
    counter = _shared["counter"]

    def advance(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    return prove_layer(layer, diff_dir, advance)


_shared: dict = {}


def _worker_start(counter) -> None:
    _shared["counter"] = counter


def prove_layers(work: List[Tuple[ImageLayer, str]], jobs: int, on_bytes: Callable[[int], None],
                 on_layer: Callable[[LayerProof], None]) -> List[LayerProof]:
    """``prove_layer`` of each (layer, diff directory), in ``jobs`` forked processes (reading and hashing are
    a core's work each), in the order given (give the largest first); ``on_bytes(total so far)`` about ten
    times a second, ``on_layer(proof)`` as each finishes; the proofs in the order given."""
    import concurrent.futures
    import multiprocessing

    if jobs <= 1 or len(work) <= 1:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            on_bytes(done[0])

        proofs = []
        for layer, diff_dir in work:
            proofs.append(prove_layer(layer, diff_dir, advance))
            on_layer(proofs[-1])
        return proofs
    context = multiprocessing.get_context("fork")
    counter = context.Value("q", 0)  # a Value crosses into workers only by inheritance: the initializer's argument
    results = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_start,
                                                initargs=(counter,)) as pool:
        futures = {pool.submit(_prove_in_worker, layer, diff_dir): i for i, (layer, diff_dir) in enumerate(work)}
        pending = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(pending, timeout=0.1)
            on_bytes(counter.value)
            for future in finished:
                results[futures[future]] = future.result()
                on_layer(results[futures[future]])
    return [results[i] for i in range(len(work))]
