"""``verify --content`` and ``plan --content``: the content proof (``content.py``) of every image layer of one
side of the root, with a bar in bytes, a line per layer and a summary."""

from __future__ import annotations

import os
import time
from typing import List, Tuple

from migrator.checks import content
from migrator.formats import overlay2
from migrator.paths import Paths
from migrator.ui.progress import Reporter

SIDES = {  # side: (the image store, where a layer's files are)
    "overlay2": ("image_overlay2", lambda p, cache_id: overlay2.diff_dir(p.tree, cache_id)),
    "aufs": ("image_aufs", lambda p, cache_id: os.path.join(p.aufs_diff, cache_id)),
}


def check(paths: Paths, side: str, jobs: int, progress: Reporter) -> Tuple[List[content.LayerProof], float]:
    """Prove every image layer of ``side``; the proofs, by chain id, and the seconds it took."""
    image_attr, diff_of = SIDES[side]
    layers = content.image_layers(getattr(paths, image_attr))
    expected = {layer.chain_id: content.expected_work(layer) for layer in layers}
    work = sorted(((layer, diff_of(paths, layer.cache_id)) for layer in layers),
                  key=lambda item: -expected[item[0].chain_id][1])
    started = time.monotonic()
    progress.start_bytes(sum(size for size, _cost in expected.values()), len(work))
    proofs = content.prove_layers(work, jobs, progress.advance_bytes,
                                  lambda proof: progress.layer_done(line(proof)))
    progress.close()
    return sorted(proofs, key=lambda p: p.chain_id), time.monotonic() - started


def line(proof: content.LayerProof) -> str:
    head = f"layer {proof.chain_id} (cache-id {proof.cache_id or '?'}): "
    if proof.status == "ok":
        return head + f"ok, {proof.bytes} bytes"
    return head + f"{proof.status.upper() if proof.status == 'failed' else proof.status}: {proof.reason}"


def lines(proofs: List[content.LayerProof], seconds: float) -> List[str]:
    """A line per layer, a line per file that differs, and the summary."""
    out = []
    for proof in proofs:
        out.append(line(proof))
        out.extend(f"  {kind}: {path} ({detail})" for kind, path, detail in proof.files)
    out.append(summary_line(proofs, seconds))
    return out


def summary_line(proofs: List[content.LayerProof], seconds: float) -> str:
    counts = {s: sum(p.status == s for p in proofs) for s in ("ok", "failed", "unverifiable")}
    total = sum(p.bytes for p in proofs)
    rate = total / seconds / (1 << 20) if seconds > 0 else 0.0
    return (f"content: {counts['ok']} layer(s) ok, {counts['failed']} failed, {counts['unverifiable']} unverifiable; "
            f"{total / (1 << 20):.1f} MiB in {seconds:.2f}s ({rate:.0f} MiB/s)")


def summary(proofs: List[content.LayerProof], seconds: float) -> dict:
    """The ``--json`` form (schema in docs/operations.md)."""
    return {"layers": [p.summary() for p in proofs],
            "ok": sum(p.status == "ok" for p in proofs), "failed": sum(p.status == "failed" for p in proofs),
            "unverifiable": sum(p.status == "unverifiable" for p in proofs),
            "bytes": sum(p.bytes for p in proofs), "seconds": round(seconds, 3)}
