#!/usr/bin/env python3
"""Benchmark: aufs2overlay run, both strategies, against `cp -al` of the same layer directories, in one run.

    .venv/bin/python tests/benchmark.py [--scale 1.0] [--rounds 5] [--workdir /var/tmp/a2o-bench] [--cold] [--binary F]
    .venv/bin/python tests/benchmark.py --startup dist/aufs2overlay-x86_64 [--rounds 11]
    .venv/bin/python tests/benchmark.py --content [--rounds 5]
    .venv/bin/python tests/benchmark.py --many-layers [--rounds 3]
    .venv/bin/python tests/benchmark.py --skew [--cold]
    .venv/bin/python tests/benchmark.py --staged [--rounds 5]
    .venv/bin/python tests/benchmark.py --many-layers --against ../other-checkout   # two trees in the same rounds

It builds a realistic aufs root (a distribution base, runtime and application layers, whiteouts, opaque
directories, containers with -init and writable layers; at scale 1.0 about 200,000 entries in 35 layers) by
hardlinking real trees of this machine (/usr, /etc, a Python installation), so building it copies no data.
Then, per round and alternating: `cp -al` of every aufs/diff/<id> into a scratch tree, `aufs2overlay run`
(hardlink strategy) and `aufs2overlay run --strategy inplace`, each a whole process from start-up to exit
with durability on, each followed by an untimed reset that returns the root to its start.  For each it
prints the median time, the ratio to `cp -al`, entries per second, the extra inodes and bytes it left on the
filesystem (statvfs before and after), and the migrator's peak RSS; and the start-up floor: a process that
only imports what `run` imports.  Needs root.  ``--binary F`` runs the single-file build F instead of the
package.  ``--startup F`` only times start-up: `F --help` against the package's `aufs2overlay --help`,
alternating, every round printed, and the medians.  ``--staged`` times, instead of the in-place strategy,
`aufs2overlay stage` (the engine would be running) and then the cutover, `aufs2overlay run` with the engine
stopped: the downtime, against the offline run of the same root in the same round.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

SOURCES = [  # (name, source trees) — a distribution base, runtimes, and libraries, like real images
    ("base", ["/usr/bin", "/usr/sbin", "/etc", "/usr/share"]),
    ("libs-a", ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"]),
    ("libs-b", ["/usr/lib/python3", "/usr/lib/gcc", "/usr/lib/jvm"]),
    ("libs-c", ["/usr/lib/llvm-14", "/usr/lib/node_modules", "/usr/lib/git-core"]),
    ("headers", ["/usr/include"]),
]


def layer_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def python_trees() -> List[str]:
    prefix = os.path.realpath(sys.prefix)
    lib = os.path.join(prefix, "lib")
    trees = [os.path.join(lib, d) for d in sorted(os.listdir(lib))
             if d.startswith("python3") and os.path.isdir(os.path.join(lib, d))]
    return trees


def add_tree(diff: str, src: str) -> None:
    """Hardlink ``src`` under ``diff`` at its own path (cp -al): a real tree, and no data copied."""
    if not os.path.isdir(src):
        return
    dest = os.path.join(diff, src.lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    sh("cp", "-al", src, dest)


def generated_layer(diff: str, n: int, seed: int, deletes: List[str], opaque: List[str]) -> None:
    """An application layer: n small files in deep and wide directories, whiteouts and opaque dirs."""
    for i in range(n):
        d = os.path.join(diff, "app", f"m{seed}", f"d{i % 37}", f"e{i % 11}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}.py"), "w") as f:
            f.write(f"# module {seed}/{i}\n")
    for path in deletes:
        parent, name = os.path.split(path.lstrip("/"))
        os.makedirs(os.path.join(diff, parent), exist_ok=True)
        wh = os.path.join(diff, parent, ".wh." + name)
        with open(wh, "w"):
            pass
        os.chmod(wh, 0o444)
    for path in opaque:
        d = os.path.join(diff, path.lstrip("/"))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, ".wh..wh..opq"), "w"):
            pass
        with open(os.path.join(d, "replaced"), "w") as f:
            f.write("new content\n")


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_engine_metadata(root: str, images: List[List[str]], containers: List[Tuple[str, str, List[str]]]) -> int:
    """What an engine leaves beside the layers, as moby writes it: a layer store entry for every image layer
    (``cache-id``, ``diff``, ``size``, ``parent``, and a real ``tar-split.json.gz``, each chain ID the sha256 of
    ``parent + " " + diff``), an image config in ``imagedb`` listing its layers' diff IDs with its
    ``lastUpdated``, ``repositories.json`` naming every image, and for every container (id, mount id, its
    image's layers) the ``mounts/`` entry and ``containers/<id>/`` (``config.v2.json`` on aufs,
    ``hostconfig.json``).  ``images``: each image's layers, bottom first.  Returns the layer store entries."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from migrator.formats import tarsplit

    image_dir = os.path.join(root, "image", "aufs")
    diff_root = os.path.join(root, "aufs", "diff")
    sha = os.path.join(image_dir, "layerdb", "sha256")
    diffs: Dict[str, Tuple[str, int]] = {}
    chains: Dict[Tuple[str, ...], str] = {}
    repositories: Dict[str, Dict[str, str]] = {}
    image_ids: List[str] = []
    for n, layers in enumerate(images):
        parent = ""
        for depth, lid in enumerate(layers):
            key = tuple(layers[:depth + 1])
            if key not in chains:
                tmp = root + ".tar-split.tmp"
                diffs[lid] = tarsplit.write(os.path.join(diff_root, lid), tmp)
                diff_id, size = diffs[lid]
                chain = diff_id if not parent else "sha256:" + hashlib.sha256(
                    f"{parent} {diff_id}".encode()).hexdigest()
                entry = os.path.join(sha, chain.split(":")[1])
                os.makedirs(entry, exist_ok=True)
                files = {"cache-id": lid, "diff": diff_id, "size": str(size)}
                if parent:
                    files["parent"] = parent
                for fname, value in files.items():
                    _write(os.path.join(entry, fname), value.encode())
                os.rename(tmp, os.path.join(entry, "tar-split.json.gz"))
                chains[key] = chain
            parent = chains[key]
        config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
                             "config": {"Cmd": ["/bin/sh"], "Env": [f"IMAGE={n}"]},
                             "rootfs": {"type": "layers", "diff_ids": [diffs[lid][0] for lid in layers]},
                             "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}).encode()
        image_id = hashlib.sha256(config).hexdigest()
        _write(os.path.join(image_dir, "imagedb", "content", "sha256", image_id), config)
        _write(os.path.join(image_dir, "imagedb", "metadata", "sha256", image_id, "lastUpdated"),
               b"2026-01-01T00:00:00.000000000Z")
        repositories[f"bench/image-{n}"] = {f"bench/image-{n}:latest": "sha256:" + image_id}
        image_ids.append(image_id)
    _write(os.path.join(image_dir, "repositories.json"), json.dumps({"Repositories": repositories}).encode())
    for n, (cid, mount_id, layers) in enumerate(containers):
        image_id = image_ids[[i for i, img in enumerate(images) if img == layers][0]]
        mounts = os.path.join(image_dir, "layerdb", "mounts", cid)
        for fname, value in (("mount-id", mount_id), ("init-id", mount_id + "-init"),
                             ("parent", chains[tuple(layers)])):
            _write(os.path.join(mounts, fname), value.encode())
        config = {"ID": cid, "Created": "2026-01-01T00:00:00Z", "Path": "/bin/sh", "Args": [],
                  "Image": "sha256:" + image_id, "Name": f"/bench-{n}", "Driver": "aufs",
                  "State": {"Running": False, "ExitCode": 0}, "Config": {"Image": f"bench/image-{n}"}}
        _write(os.path.join(root, "containers", cid, "config.v2.json"), json.dumps(config).encode())
        _write(os.path.join(root, "containers", cid, "hostconfig.json"), b'{"NetworkMode":"none"}')
    return len(chains)


def add_container(root: str, cid: str, image_top: List[str], files: int, seed: int) -> str:
    """A container's ``-init`` layer (the files the engine writes there) and its writable layer on the image
    whose layers are ``image_top`` (nearest first); returns its mount ID (as the aufs driver names it here,
    the container's ID)."""
    diff_root = os.path.join(root, "aufs", "diff")
    for lid, parents in ((cid + "-init", image_top), (cid, [cid + "-init"] + image_top)):
        os.makedirs(os.path.join(diff_root, lid))
        _write(os.path.join(root, "aufs", "layers", lid), "".join(p + "\n" for p in parents).encode())
    for f in ("hosts", "hostname", "resolv.conf"):
        _write(os.path.join(diff_root, cid + "-init", "etc", f), b"")
    generated_layer(os.path.join(diff_root, cid), files, seed, ["/etc/motd"] if seed % 2 else [], [])
    return cid


def build_many_layers(root: str, chains: int = 150, depth: int = 20, per_layer: int = 48) -> Tuple[int, int]:
    """Many small layers (CI hosts, build servers): ``chains`` chains of ``depth`` layers of about ``per_layer``
    files, a whiteout of the parent's first file in every fifth layer; (layers, entries)."""
    diff_root = os.path.join(root, "aufs", "diff")
    layers_root = os.path.join(root, "aufs", "layers")
    os.makedirs(diff_root)
    os.makedirs(layers_root)
    for sub in ("layerdb/sha256", "imagedb/content/sha256", "imagedb/metadata/sha256"):
        os.makedirs(os.path.join(root, "image", "aufs", sub))
    images: List[List[str]] = []
    for c in range(chains):
        chain: List[str] = []
        for d in range(depth):
            lid = layer_id(f"many-{c}-{d}")
            os.makedirs(os.path.join(diff_root, lid))
            with open(os.path.join(layers_root, lid), "w") as f:
                f.write("".join(p + "\n" for p in reversed(chain)))
            seed = c * depth + d
            layer = os.path.join(diff_root, lid)
            for i in range(per_layer):  # about 52 entries: app/, m<seed>/, 10 directories, the files
                sub = os.path.join(layer, "app", f"m{seed}", f"d{i % 10}")
                os.makedirs(sub, exist_ok=True)
                with open(os.path.join(sub, f"f{i}.py"), "w") as f:
                    f.write(f"# module {seed}/{i}\n")
            if d % 5 == 4:  # a whiteout of a file of the parent layer in every fifth layer
                parent = os.path.join(layer, "app", f"m{seed - 1}", "d0")
                os.makedirs(parent, exist_ok=True)
                open(os.path.join(parent, ".wh.f0.py"), "w").close()
            chain.append(lid)
        images.append(chain)
    containers = []
    for c in range(0, chains, 15):  # a container on every 15th image
        cid = layer_id(f"many-container-{c}")
        containers.append((cid, add_container(root, cid, list(reversed(images[c])), 40, c), images[c]))
    write_engine_metadata(root, images, containers)
    entries = int(subprocess.run(["sh", "-c", f"find {diff_root} -mindepth 2 | wc -l"], capture_output=True,
                                 text=True, check=True).stdout)
    return len(os.listdir(diff_root)), entries


def build_root(root: str, scale: float, skew: bool = False) -> Tuple[int, int]:
    """Write the benchmark root; return (layers, entries). ``skew``: the distribution's trees all in the base
    layer, which then holds about 80% of the entries (as real images' base or node_modules layers do)."""
    diff_root = os.path.join(root, "aufs", "diff")
    layers_root = os.path.join(root, "aufs", "layers")
    os.makedirs(diff_root)
    os.makedirs(layers_root)
    for sub in ("layerdb/sha256", "imagedb/content/sha256", "imagedb/metadata/sha256"):  # as an engine makes them
        os.makedirs(os.path.join(root, "image", "aufs", sub))
    chain: List[str] = []

    def new_layer(name: str, parents: List[str]) -> str:
        lid = layer_id(name)
        os.makedirs(os.path.join(diff_root, lid))
        with open(os.path.join(layers_root, lid), "w") as f:
            f.write("".join(p + "\n" for p in parents))
        return lid

    sources = list(SOURCES) + [(f"python-{i}", [t]) for i, t in enumerate(python_trees())]
    if skew:
        sources = [("base", [t for _n, trees in SOURCES for t in trees])] + sources[len(SOURCES):]
    for name, trees in sources:
        lid = new_layer(name, list(reversed(chain)))
        for tree in trees:
            add_tree(os.path.join(diff_root, lid), tree)
        chain.append(lid)
    n_app = max(1, int(25 * scale))
    per_layer = int(2100 * scale)
    deletable = [p for p in ("/usr/bin/perl", "/usr/share/doc", "/etc/motd", "/usr/share/man", "/usr/bin/gcc")
                 if os.path.lexists(p)]
    for i in range(n_app):
        lid = new_layer(f"app-{i}", list(reversed(chain)))
        generated_layer(os.path.join(diff_root, lid), per_layer, i, deletable[i % len(deletable):][:1] if i % 3 == 0
                        else [], ["/usr/share/zoneinfo"] if i % 7 == 3 else [])
        chain.append(lid)
    containers = []
    for c in range(2):
        cid = layer_id(f"container-{c}")
        containers.append((cid, add_container(root, cid, list(reversed(chain)), 300, 100 + c), chain))
    write_engine_metadata(root, [chain], containers)
    entries = int(subprocess.run(["sh", "-c", f"find {diff_root} -mindepth 2 | wc -l"], capture_output=True,
                                 text=True, check=True).stdout)
    return len(os.listdir(diff_root)), entries


def in_child(build, *args):
    """Build the root in a forked process: the tar-splits of a big layer take hundreds of MiB, and a process
    forked from a big parent reports the parent's pages as its peak RSS (``wait4``) until it execs."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(build, *args).result()


def image_staging_seconds(log: str) -> float:
    """From a run's ``--log-file``: the time from the switching phase's start to the image store's copy made
    ("image store copied", or "image store brought up to date" from the copy ``stage`` made)."""
    stamps = {}
    with open(log) as f:
        for line in f:
            stamp, _, text = line.rstrip("\n").partition(" ")
            for key in ("phase: switching", "image store "):
                if text.startswith(key):
                    stamps[key] = datetime.datetime.fromisoformat(stamp)
    return (stamps["image store "] - stamps["phase: switching"]).total_seconds()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(cmd: List[str], where: str, cwd: Optional[str] = None) -> Tuple[float, int, int, int]:
    """Wall time, peak RSS (KiB), and the inodes and bytes the filesystem of ``where`` has fewer free after
    it, of one command started on a quiet disk (earlier deletions synced), in ``cwd``."""
    os.sync()
    before = os.statvfs(where)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=cwd)
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    os.sync()
    after = os.statvfs(where)
    inodes = before.f_ffree - after.f_ffree
    used = (before.f_bfree - after.f_bfree) * before.f_frsize
    return elapsed, usage.ru_maxrss, inodes, used


def reset(root: str, trash: str, strategy: str) -> None:
    """Undo a run without deleting anything yet: deleting 200,000 links and 26,000 directories between
    rounds made every later round slower (the filesystem is mounted with discard), so the migrated trees
    are moved aside, like the cp -al copies, and deleted after the last round.  The in-place strategy moved
    the layers: its own rollback moves them back first."""
    if strategy == "inplace":
        sh(sys.executable, "-m", "migrator", "rollback", "--root", root, "--engine-pidfile", "/nonexistent",
           "--force", "-q")
    os.makedirs(trash)
    for rel in ("overlay2", "image/overlay2", ".aufs2overlay"):
        if os.path.lexists(os.path.join(root, rel)):
            os.rename(os.path.join(root, rel), os.path.join(trash, rel.replace("/", "-")))
    for config, data in CONTAINER_CONFIGS.items():  # the hardlink strategy's run switched them to overlay2
        with open(config, "wb") as f:
            f.write(data)


CONTAINER_CONFIGS: Dict[str, bytes] = {}
"""Each container's config.v2.json as built, put back by ``reset``."""


def save_container_configs(root: str) -> None:
    top = os.path.join(root, "containers")
    for cid in os.listdir(top) if os.path.isdir(top) else []:
        path = os.path.join(top, cid, "config.v2.json")
        with open(path, "rb") as f:
            CONTAINER_CONFIGS[path] = f.read()


def cp_al_whole(root: str, scratch: str) -> List[str]:
    """One cp -al of the whole aufs/diff: the reference for thousands of small layers."""
    return ["cp", "-al", os.path.join(root, "aufs", "diff"), scratch]


def cp_al(root: str, scratch: str) -> List[str]:
    diff_root = os.path.join(root, "aufs", "diff")
    ids = sorted(os.listdir(diff_root))
    script = f"mkdir -p {scratch} && cd {diff_root} && for d in {' '.join(ids)}; do cp -al $d {scratch}/$d; done"
    return ["sh", "-c", script]


def round_order(names: List[str], checkout: Dict[str, Optional[str]], r: int) -> List[str]:
    """The commands of round ``r`` in the order they run: as listed, but with ``--against`` each strategy's two
    trees swap places every other round: with this tree always first, the same two trees' hardlink runs
    differed by +23% on 3,000 layers, and by -9% alternating, the same hour (2026-12-06)."""
    if not checkout or r % 2 == 0:
        return names
    order = list(names)
    for i, name in enumerate(order[:-1]):
        after = order[i + 1]
        if name not in checkout and checkout.get(after) is not None:
            order[i], order[i + 1] = after, name
    return order


def machine(workdir: str) -> Dict[str, str]:
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,OPTIONS", "-T", workdir], capture_output=True, text=True).stdout
    return {"cores": str(os.cpu_count()), "kernel": platform.release(), "python": platform.python_version(),
            "filesystem": fs.strip(), "cpu": platform.processor() or platform.machine()}


def status_timing(workdir: str, n_layers: int = 5000, runs: int = 7) -> float:
    """Median wall time of `aufs2overlay status --json` on a state database of ``n_layers`` layers."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from migrations_state.schema import LayerRecord
    from migrations_state.store import Store
    from migrator.formats.linkid import new_link_ids

    root = os.path.join(workdir, "status-root")
    os.makedirs(os.path.join(root, "aufs", "diff"))
    os.makedirs(os.path.join(root, ".aufs2overlay"))
    links = new_link_ids(n_layers)
    layers = [LayerRecord(id=f"{i:064x}", seq=i, parent=None, ancestors="", link_id=links[i], has_child=False,
                          state=("committed", "linked", "discovered")[i % 3]) for i in range(n_layers)]
    Store.create(os.path.join(root, ".aufs2overlay", "state.db"), root, "hardlink", layers, [], []).close()
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "migrator", "status", "--root", root, "--json"],
                       stdout=subprocess.DEVNULL)
        times.append(time.monotonic() - start)
    return statistics.median(times)


def startup_timing(binary: str, rounds: int) -> int:
    """Median wall time of ``--help``: the single-file build against the package, alternating."""
    commands = {"single file": [binary, "--help"], "package": [sys.executable, "-m", "migrator", "--help"]}
    times: Dict[str, List[float]] = {name: [] for name in commands}
    for r in range(rounds):
        for name, cmd in commands.items():
            start = time.monotonic()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.monotonic() - start)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)
    for name, rows in times.items():
        print(f"{name:12} median {statistics.median(rows):.3f} s, min {min(rows):.3f} s, max {max(rows):.3f} s")
    return 0


def content_timing(args: argparse.Namespace) -> int:
    """``verify --content`` of a migrated benchmark root against ``cat`` of the same files (the payloads its
    tar-splits name, each once), alternating, warm page cache, every round printed."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from migrator.formats import images, tarsplit

    shutil.rmtree(args.workdir, ignore_errors=True)
    root = os.path.join(args.workdir, "docker")
    n_layers, n_entries = in_child(build_root, root, args.scale)
    image = [layer.cache_id for layer in images.image_layers(os.path.join(root, "image", "aufs"))]
    sh(sys.executable, "-m", "migrator", "run", "--root", root, "--engine-pidfile", "/nonexistent", "-q")
    files = os.path.join(args.workdir, "files")
    total = 0
    with open(files, "wb") as out:
        for layer in images.image_layers(os.path.join(root, "image", "overlay2")):
            diff = os.path.join(root, "overlay2", layer.cache_id, "diff")
            for entry in tarsplit.entries(layer.tar_split):
                if entry.get("type") == 1 and entry.get("size"):
                    name = base64.b64decode(entry["name_raw"]) if entry.get("name_raw") else entry["name"].encode()
                    out.write(os.path.join(os.fsencode(diff), name) + b"\0")
                    total += entry["size"]
    print(f"machine: {machine(args.workdir)}")
    print(f"root: {n_layers} layers, {n_entries} entries; {len(image)} image layers, {total / (1 << 20):.0f} MiB "
          "of file payloads")
    commands = {"cat": ["sh", "-c", f"xargs -0 cat < {files} > /dev/null"],
                "verify --content": [sys.executable, "-m", "migrator", "verify", "--root", root, "--content"]}
    sh(*commands["cat"])  # warm the page cache
    times: Dict[str, List[float]] = {name: [] for name in commands}
    for r in range(args.rounds):
        for name, cmd in commands.items():
            times[name].append(timed(cmd, args.workdir)[0])
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s ({t[-1] / times['cat'][-1]:.2f}x)"
                                             for n, t in times.items()), flush=True)
    ref = statistics.median(times["cat"])
    for name, rows in times.items():
        med = statistics.median(rows)
        print(f"{name:18} median {med:.2f} s, {med / ref:.2f} x cat, {total / med / (1 << 20):.0f} MiB/s")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="application-layer size factor (default 1.0)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp/a2o-bench")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timed command")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--jobs", type=int, default=None, help="aufs2overlay run --jobs (default: its own)")
    ap.add_argument("--binary", metavar="F", default=None, help="run the single-file build F, not the package")
    ap.add_argument("--startup", metavar="F", default=None,
                    help="only time start-up (--help) of the single-file build F against the package")
    ap.add_argument("--content", action="store_true",
                    help="only time verify --content of a migrated root against cat of the same files")
    ap.add_argument("--skew", action="store_true", help="one layer holds about 80%% of the entries")
    ap.add_argument("--staged", action="store_true",
                    help="time stage, then the cutover (run), against the offline run (the downtime)")
    ap.add_argument("--against", metavar="DIR", default=None,
                    help="also time the migrator of the checkout DIR (python -m migrator from there) in the same "
                         "rounds, each strategy beside this tree's (not with --staged or --binary)")
    ap.add_argument("--many-layers", action="store_true",
                    help="about 3,000 small layers in chains of 20; the reference is one cp -al of aufs/diff")
    args = ap.parse_args()
    if args.startup:
        return startup_timing(args.startup, args.rounds)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root")
    if args.content:
        return content_timing(args)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root")
    if args.against and (args.staged or args.binary):
        raise SystemExit("--against times runs only: not with --staged or --binary")
    shutil.rmtree(args.workdir, ignore_errors=True)
    root = os.path.join(args.workdir, "docker")
    scratch = os.path.join(args.workdir, "scratch")
    if args.many_layers:
        n_layers, n_entries = in_child(build_many_layers, root)
    else:
        n_layers, n_entries = in_child(build_root, root, args.scale, args.skew)
    save_container_configs(root)
    n_whiteouts = int(subprocess.run(["sh", "-c", f"find {root}/aufs/diff -name '.wh.*' | wc -l"],
                                     capture_output=True, text=True, check=True).stdout)
    print(f"machine: {machine(args.workdir)}")
    print(f"root: {n_layers} layers, {n_entries} entries")
    program = [os.path.abspath(args.binary)] if args.binary else [sys.executable, "-m", "migrator"]
    migrate = program + ["run", "--root", root, "--engine-pidfile", "/nonexistent", "-q"]
    if args.jobs:
        migrate += ["--jobs", str(args.jobs)]
    strategies = {"run (hardlink)": "hardlink", "run --strategy inplace": "inplace"}
    checkout: Dict[str, Optional[str]] = {}  # where each timed run starts (``python -m migrator`` of that tree)
    if args.against:
        for name, strategy in list(strategies.items()):
            strategies[f"{name} [{os.path.basename(os.path.abspath(args.against))}]"] = strategy
            checkout[f"{name} [{os.path.basename(os.path.abspath(args.against))}]"] = os.path.abspath(args.against)
        strategies = dict(sorted(strategies.items(), key=lambda item: item[1] != "hardlink"))
    if args.staged:
        strategies = {"run (hardlink)": "hardlink", "stage (engine running)": "stage", "cutover (run)": "cutover"}
    stage = program + ["stage", "--root", root, "-q"] + (["--jobs", str(args.jobs)] if args.jobs else [])
    results: Dict[str, List[Tuple[float, int, int, int]]] = {name: [] for name in ["cp -al", *strategies]}
    floor: List[float] = []
    staging: Dict[str, List[float]] = {name: [] for name, s in strategies.items() if s != "stage"}
    image_copy: List[float] = []
    for r in range(args.rounds):
        floor.append(timed([sys.executable, "-c", "import migrator.commands"], args.workdir)[0])
        image_copy.append(timed(["cp", "-al", os.path.join(root, "image", "aufs"), f"{scratch}-image-{r}"],
                                args.workdir)[0])
        for name in round_order(list(results), checkout, r):
            if args.cold:
                drop_caches()
            if name == "cp -al":
                reference = cp_al_whole if args.many_layers else cp_al
                results[name].append(timed(reference(root, f"{scratch}-{r}"), args.workdir))
                continue
            strategy = strategies[name]
            if strategy == "stage":  # the staging is kept for the cutover, timed next
                results[name].append(timed(stage, args.workdir))
                continue
            log = os.path.join(args.workdir, f"run-{r}-{strategy}.log")
            results[name].append(timed(migrate + (["--strategy", strategy] if strategy != "cutover" else [])
                                       + ["--log-file", log], args.workdir, checkout.get(name)))
            staging[name].append(image_staging_seconds(log))
            reset(root, os.path.join(args.workdir, f"trash-{r}-{list(results).index(name)}"),
                  "hardlink" if args.staged else strategy)
        this_ref = results["cp -al"][-1][0]
        print(f"round {r + 1}: " + ", ".join(f"{name} {rows[-1][0]:.2f}s ({rows[-1][0] / this_ref:.2f}x)"
                                             for name, rows in results.items())
              + f", start-up floor {floor[-1]:.2f}s", flush=True)
    ref = statistics.median(t[0] for t in results["cp -al"])
    print(f"\n{'':24} {'median s':>9} {'ratio':>7} {'entries/s':>10} {'+inodes':>9} {'+MiB':>8} {'peak RSS':>9}")
    for name, rows in results.items():
        med = statistics.median(t[0] for t in rows)
        inodes = statistics.median(t[2] for t in rows)
        mib = statistics.median(t[3] for t in rows) / (1 << 20)
        rss = "" if name == "cp -al" else f"{max(t[1] for t in rows) / 1024:.0f} MiB"
        print(f"{name:24} {med:9.2f} {med / ref:7.2f} {n_entries / med:10.0f} {inodes:9.0f} {mib:8.1f} {rss:>9}")
    print(f"whiteouts and opaque markers in the root: {n_whiteouts}")
    if args.staged:
        offline = statistics.median(t[0] for t in results["run (hardlink)"])
        cutover = statistics.median(t[0] for t in results["cutover (run)"])
        per_round = [c[0] / o[0] for c, o in zip(results["cutover (run)"], results["run (hardlink)"])]
        print(f"cutover after stage: median {cutover:.2f} s, {100 * cutover / offline:.1f}% of the offline run "
              f"({offline:.2f} s); per round {', '.join(f'{100 * x:.1f}%' for x in per_round)}")
    print("image store staging (from the run's log), median: " + ", ".join(
        f"{name} {statistics.median(rows):.2f} s" for name, rows in staging.items())
        + f"; cp -al of image/aufs {statistics.median(image_copy):.2f} s")
    print(f"start-up floor (interpreter and the imports every run makes): median {statistics.median(floor):.2f} s, "
          f"{statistics.median(floor) / ref:.2f} x cp -al")
    print(f"status --json on 5,000 layers: median {status_timing(args.workdir):.3f} s over 7 runs")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
