"""``verify --content`` and ``plan --content``: the content check (``layerdigest.py``) of every image layer of one
side of the root, with a bar in bytes, a line per layer and a summary."""

from __future__ import annotations

import json
import time
from typing import Callable, List, Tuple

from migrator import interrupts, procs
from migrator.checks import layerdigest
from migrator.errors import EXIT_FAILED, EXIT_OK, Refused
from migrator.formats import images, overlay2
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.ui.progress import Reporter

SIDES = {  # side: (the image store, where a layer's files are)
    "overlay2": (lambda p: p.image_overlay2, lambda p, cache_id: overlay2.diff_dir(p.tree, cache_id)),
    "aufs": (lambda p: p.image_aufs, lambda p, cache_id: p.aufs_layer(cache_id)),
}


def check(paths: Paths, side: str, jobs: int, progress: Reporter) -> Tuple[List[layerdigest.LayerDigest], float]:
    """Prove every image layer of ``side``; the checked, by chain id, and the seconds it took."""
    image_dir, diff_of = SIDES[side]
    layers = images.image_layers(image_dir(paths))
    expected = {layer.chain_id: layerdigest.expected_work(layer) for layer in layers}
    work = sorted(((layer, diff_of(paths, layer.cache_id)) for layer in layers),
                  key=lambda item: -expected[item[0].chain_id][1])
    started = time.monotonic()
    progress.start_bytes(sum(size for size, _cost in expected.values()), len(work))
    checked = check_digests(work, jobs, progress.advance_bytes,
                                  lambda result: progress.layer_done(line(result)))
    progress.close()
    return sorted(checked, key=lambda p: p.chain_id), time.monotonic() - started


def verify_overlay2(paths: Paths, as_json: bool, jobs: int, progress: Reporter) -> int:
    """``verify --content``: print the result of every image layer on overlay2; exit 1 when one failed."""
    if not fsio.lexists(paths.image_overlay2):
        raise Refused(f"{paths.root} has no image/overlay2/: nothing is migrated yet ('aufs2overlay plan --content' "
                      "checks the layers on aufs)")
    checked, seconds = check(paths, "overlay2", jobs, progress)
    if as_json:
        print(json.dumps({"root": paths.root, "side": "overlay2", **summary(checked, seconds)},
                         indent=2, sort_keys=True))
    else:
        print("\n".join(lines(checked, seconds)))
    return EXIT_FAILED if any(p.status == "failed" for p in checked) else EXIT_OK


def line(result: layerdigest.LayerDigest) -> str:
    head = f"layer {result.chain_id} (cache-id {result.cache_id or '?'}): "
    if result.status == "ok":
        return head + f"ok, {result.bytes} bytes"
    return head + f"{result.status.upper() if result.status == 'failed' else result.status}: {result.reason}"


def lines(checked: List[layerdigest.LayerDigest], seconds: float) -> List[str]:
    """A line per layer, a line per file that differs, and the summary."""
    out = []
    for result in checked:
        out.append(line(result))
        out.extend(f"  {kind}: {path} ({detail})" for kind, path, detail in result.files)
    out.append(summary_line(checked, seconds))
    return out


def summary_line(checked: List[layerdigest.LayerDigest], seconds: float) -> str:
    counts = {s: sum(p.status == s for p in checked) for s in ("ok", "failed", "unverifiable")}
    total = sum(p.bytes for p in checked)
    rate = total / seconds / (1 << 20) if seconds > 0 else 0.0
    return (f"content: {counts['ok']} layer(s) ok, {counts['failed']} failed, {counts['unverifiable']} unverifiable; "
            f"{total / (1 << 20):.1f} MiB in {seconds:.2f}s ({rate:.0f} MiB/s)")


def summary(checked: List[layerdigest.LayerDigest], seconds: float) -> dict:
    """The ``--json`` form (schema in docs/operations.md)."""
    return {"layers": [p.summary() for p in checked],
            "ok": sum(p.status == "ok" for p in checked), "failed": sum(p.status == "failed" for p in checked),
            "unverifiable": sum(p.status == "unverifiable" for p in checked),
            "bytes": sum(p.bytes for p in checked), "seconds": round(seconds, 3)}


def check_digests(work: List[Tuple[images.ImageLayer, str]], jobs: int, on_bytes: Callable[[int], None],
                 on_layer: Callable[[layerdigest.LayerDigest], None]) -> List[layerdigest.LayerDigest]:
    """``check_layer`` of each (layer, diff directory), in ``jobs`` forked processes (reading and hashing are
    a core's work each), in the order given (give the largest first); ``on_bytes(total so far)`` about ten
    times a second, ``on_layer(result)`` as each finishes; the checked in the order given."""
    import concurrent.futures
    import multiprocessing

    if jobs <= 1 or len(work) <= 1:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            on_bytes(done[0])

        checked = []
        for layer, diff_dir in work:
            checked.append(layerdigest.check_layer(layer, diff_dir, advance))
            on_layer(checked[-1])
        return checked
    context = multiprocessing.get_context("fork")
    counter = context.Value("q", 0)  # a Value crosses into workers only by inheritance: the initializer's argument
    results = {}
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_start,
                                                  initargs=(counter,))
    try:
        futures = {pool.submit(_check_in_worker, layer, diff_dir): i for i, (layer, diff_dir) in enumerate(work)}
        pending = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(pending, timeout=0.1)
            on_bytes(counter.value)
            interrupts.check()
            for future in finished:
                results[futures[future]] = future.result()
                on_layer(results[futures[future]])
    except BaseException:
        # The result only reads: its workers need not finish a layer (they die with the migrator).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [results[i] for i in range(len(work))]


def _check_in_worker(layer: images.ImageLayer, diff_dir: str) -> layerdigest.LayerDigest:
    counter = _shared["counter"]
    local = [0]

    def flush() -> None:
        with counter.get_lock():
            counter.value += local[0]
        local[0] = 0

    def advance(n: int) -> None:  # the shared counter every 4 MiB, not at every small file
        local[0] += n
        if local[0] >= 4 << 20:
            flush()

    try:
        return layerdigest.check_layer(layer, diff_dir, advance)
    finally:
        flush()


_shared: dict = {}


def _worker_start(counter) -> None:
    procs.die_with_parent()
    interrupts.ignore_in_worker()
    _shared["counter"] = counter
