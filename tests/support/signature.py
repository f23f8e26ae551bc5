"""What a finished migration produced, with the random link ids factored out, so two runs can be compared."""

from __future__ import annotations

import os
import stat

from tests.support.manifest import manifest


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def tree_signature(root: str) -> dict:
    tree = os.path.join(root, "overlay2")
    links = {name: os.readlink(os.path.join(tree, "l", name)) for name in os.listdir(os.path.join(tree, "l"))}
    by_link = {link: target.split("/")[1] for link, target in links.items()}
    sig = {".": _mode(tree), "l": (_mode(os.path.join(tree, "l")), sorted(links.values()))}
    for layer in sorted(os.listdir(tree)):
        if layer == "l":
            continue
        ldir = os.path.join(tree, layer)
        entry = {".": _mode(ldir)}
        for name in sorted(os.listdir(ldir)):
            path = os.path.join(ldir, name)
            if name == "diff":
                entry[name] = manifest(path)
            elif name == "link":
                with open(path) as f:
                    entry[name] = (_mode(path), by_link.get(f.read()))
            elif name == "lower":
                with open(path) as f:
                    entry[name] = (_mode(path), [by_link.get(x[2:]) for x in f.read().split(":")])
            elif name == "work":
                entry[name] = (_mode(path), os.listdir(path))
            elif name == "committed":
                entry[name] = (_mode(path), os.path.getsize(path))
            else:
                entry[name] = "unexpected"
        sig[layer] = entry
    sig["image/overlay2"] = manifest(os.path.join(root, "image", "overlay2"))
    containers = os.path.join(root, "containers")
    for cid in sorted(os.listdir(containers)) if os.path.isdir(containers) else []:
        cfg = os.path.join(containers, cid, "config.v2.json")
        if os.path.exists(cfg):
            with open(cfg, "rb") as f:
                sig[f"containers/{cid}"] = (f.read(), _mode(cfg))
    return sig
