"""The oracle: one generated root, migrated, judged by the kernel against the independent aufs model.

For a root and a strategy: ``run`` must succeed; every chain, mounted by the kernel's overlayfs from the new
tree, must show exactly what ``tests/support/aufsview.py`` computes from the aufs layers (read before the run);
the hardlink strategy must leave the aufs side untouched; ``verify`` must say ok; ``rollback --force`` must give
the whole root back byte for byte (the manifest, with its hardlink groups).  Crash mode first runs the root
once undisturbed (on a ``cp -a`` copy) to count its checkpoints, kills the root's run at one of them, resumes
it, and asks for the same tree as well; then kills the rollback likewise before the one that must be exact.

The migrator runs in a child forked from the test process with ``migrator.cli.main`` already imported: the
same code path as the command (its arguments, its exit code), without the interpreter's start-up per call.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from typing import Dict, List, Optional, Tuple

from migrator import checkpoints, cli
from migrator import commands as _commands  # noqa: F401  imported once here, not in every child
from tests.fuzz import rootgen
from tests.support import realaufs
from tests.support.manifest import diff_manifests, manifest
from tests.support.overlaymount import mounted_chain
from tests.support.rootstate import aufs_side, whole_root
from tests.support.signature import tree_signature

NO_ENGINE = ("--engine-pidfile", "/nonexistent")


class Divergence(AssertionError):
    """The migrated root differs from what aufs showed, or a command failed: the example is a bug.  ``kind``
    says what differed without the example's names (the long run counts each kind once)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind or message.split(":", 1)[0]


FIELDS = ("type", "mode", "owner", "group", "mtime", "content", "xattrs")


def _view_kind(expected: dict, got: dict) -> str:
    """What the first difference between two views is: an entry missing, extra, or which of its fields."""
    for path in sorted(set(expected) | set(got)):
        a, b = expected.get(path), got.get(path)
        if a == b:
            continue
        if b is None:
            return "chain view: an entry aufs shows is missing in overlay"
        if a is None:
            return "chain view: overlay shows an entry aufs hides"
        return "chain view: the entry's " + "/".join(f for f, x, y in zip(FIELDS, a, b) if x != y) + " differ"
    return "chain view: equal"


def call(argv: List[str], env: Optional[Dict[str, str]] = None) -> Tuple[int, str, int]:
    """``aufs2overlay argv`` in a forked child: (exit code, or minus the signal that killed it; its output;
    the checkpoints it passed, counted by the child itself when no hook was armed)."""
    out = tempfile.TemporaryFile()
    count_r, count_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test process
        code = 70
        try:
            os.close(count_r)
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            os.environ.update(env or {})
            try:
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            os.write(count_w, str(checkpoints._hooks.count).encode())
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(count_w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(count_r, "rb") as f:
        counted = int(f.read() or b"0")
    out.seek(0)
    text = out.read().decode(errors="backslashreplace")
    out.close()
    code = os.waitstatus_to_exitcode(status)
    return code, text, counted


def _check(what: str, res: Tuple[int, str, int], code: int = 0) -> None:
    if res[0] != code or "Traceback" in res[1]:
        last = [line for line in res[1].splitlines() if line.strip()][-1:] or [""]
        raise Divergence(f"{what}: exit {res[0]}, expected {code}\n{res[1][-3000:]}",
                         f"{what}: exit {res[0]}: {re.sub(r'[0-9a-f]{12,}|/[^ ]*', '…', last[0])[:100]}")


def _run_args(root: str, strategy: str, jobs: int) -> List[str]:
    return ["run", "--root", root, *NO_ENGINE, "-q", "--strategy", strategy, "-j", str(jobs)]


def _rollback_args(root: str) -> List[str]:
    return ["rollback", "--root", root, *NO_ENGINE, "--force", "-q"]


def judge(spec: dict, strategy: str, jobs: int = 1, kill_fraction: Optional[float] = None, guest=None) -> dict:
    """Build ``spec``, migrate it, and judge the result; raise ``Divergence`` on any difference.  With
    ``guest`` (``tests/support/aufsvm.Guest``), the real aufs judges too: it shows each chain before the run,
    the model must agree with it, and overlayfs in the same guest must show the migrated chain as aufs did.
    Returns what was done (entries, chains mounted, the checkpoint killed at)."""
    scratch = tempfile.mkdtemp(prefix="a2o-fuzz-", dir=os.environ.get("A2O_FUZZ_TMP"))
    try:
        return _judge(scratch, spec, strategy, jobs, kill_fraction, guest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _judge(scratch: str, spec: dict, strategy: str, jobs: int, kill_fraction: Optional[float], guest) -> dict:
    root = os.path.join(scratch, "docker")
    rootgen.build(spec, root)
    before = whole_root(root)
    aufs_before = aufs_side(root)
    chains = realaufs.chains_of(root)
    views = realaufs.model_views(root, chains)
    pre = os.path.join(scratch, "pre")
    if guest is not None:
        realaufs.copy_tree(root, pre)
    done = {"entries": rootgen.entry_count(spec), "chains": len(views), "killed_at": None}
    reference = clean = None
    if kill_fraction is not None:
        clean = os.path.join(scratch, "clean")
        subprocess.run(["cp", "-a", root, clean], check=True)  # the same times as the root to kill
        res = call(_run_args(clean, strategy, jobs))
        _check("undisturbed run", res)
        reference = tree_signature(clean)
        total = res[2]
        kill_at = 1 + int(kill_fraction * total)
        res = call(_run_args(root, strategy, jobs), {"AUFS2OVERLAY_KILL_AT": str(kill_at)})
        if res[0] == 0:
            raise Divergence(f"the run passed checkpoint {kill_at} of {total} without being killed")
        done["killed_at"] = (kill_at, total)
    _check("run", call(_run_args(root, strategy, jobs)))
    if strategy == "hardlink" and aufs_side(root) != aufs_before:
        raise Divergence("the hardlink strategy changed the aufs side")
    tree = os.path.join(root, "overlay2")
    findings = realaufs.findings_of(root)
    asked = realaufs.ask(guest, pre, root, chains) if guest is not None else None
    try:  # the guest reads its copy meanwhile
        _judge_on_host(root, tree, views, chains, findings, reference, kill_fraction, clean, before)
    finally:
        seen = asked.views() if asked is not None else None
    if seen is not None:
        judged = realaufs.judge_root(seen, chains, views, findings)
        if judged.model:
            raise Divergence("the real aufs and the model disagree:\n"
                             + realaufs.describe_differences(judged.model),
                             realaufs.first_kind(judged.model, "real aufs against the model"))
        if judged.migration:
            raise Divergence("the real aufs and the migrated tree (overlayfs in the same guest) differ:\n"
                             + realaufs.describe_differences(judged.migration),
                             realaufs.first_kind(judged.migration, "real aufs against overlayfs"))
    return done


def _judge_on_host(root, tree, views, chains, findings, reference, kill_fraction, clean, before) -> None:
    """The migrated chains mounted here against the model, the resumed tree against the undisturbed one,
    ``verify``, and the rollback (killed too, in crash mode) that must give the root back exactly."""
    for lid, expected in sorted(views.items()):
        with mounted_chain(tree, lid) as mnt:
            got = manifest(mnt)
        wrong = realaufs.differences(expected.entries, got, realaufs.allowed_paths(findings, chains[lid]))
        if wrong:
            raise Divergence(f"layer {lid}: (path, model of aufs, overlay) {wrong}",
                             _view_kind(expected.entries, got))
    if reference is not None and tree_signature(root) != reference:
        raise Divergence("the resumed run made another tree than the undisturbed one")
    _check("verify", call(["verify", "--root", root]))
    if kill_fraction is not None:  # the rollback killed too, at the same fraction of its checkpoints
        res = call(_rollback_args(clean))
        _check("undisturbed rollback", res)
        kill_at = 1 + int(kill_fraction * res[2])
        res = call(_rollback_args(root), {"AUFS2OVERLAY_KILL_AT": str(kill_at)})
        if res[0] == 0:
            raise Divergence(f"the rollback passed checkpoint {kill_at} of {res[2]} without being killed")
    _check("rollback --force", call(_rollback_args(root)))
    after = whole_root(root)
    if after != before:
        raise Divergence(f"rollback: (path, before, after) {diff_manifests(before[0], after[0], 8)}"
                         f"{'' if after[1] == before[1] else ' and the hardlink groups differ'}")
