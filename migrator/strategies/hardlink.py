"""The hardlink strategy (the default): each layer's overlay2 tree is built beside the untouched aufs data.

Every entry is hardlinked (a container's writable layer is copied: overlay2 writes into it in place), so
aufs/ stays exactly as it was until cleanup, and a rollback only removes what was built.  The link and whiteout
steps walk the layers; the runner hands them to worker processes.  A wave's link work goes out in two rounds,
so that one big layer keeps every worker busy: first each layer down to ``SPLIT_DEPTH``, then every subtree
below that depth, of all the layers, spread over the workers (``linker.start_layer``, ``linker.link_part``).
A layer is ``linked`` only once all of its parts are done and the wave's ``syncfs`` has made them durable.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Dict, List, Optional, Tuple

from migrations_state.machine import CONVERT_WHITEOUTS, LINK
from migrations_state.schema import LayerRecord
from migrator.scan.findings import StepResult
from migrator.scan.survey import LayerSurvey
from migrator.strategies import linker
from migrator.strategies.base import Conversion, LayerTask, Strategy, Work, run_in_chunks

SPLIT_DEPTH = 2  # a layer's subtrees at this depth (``usr/lib``, ``usr/share``, …) are linked as parts


class HardlinkTask(LayerTask):
    @property
    def src(self) -> str:
        return os.path.join(self.paths.aufs_diff, self.id)

    def work(self, trigger: str) -> Optional[Work]:
        if trigger == LINK:
            return linker.build_layer_tree, (self.src, self.paths.temp_tree, self.id, self.record.writable)
        if trigger == CONVERT_WHITEOUTS:
            return linker.convert_whiteouts, (self.src, self.paths.temp_tree, self.id, self.whiteout_dirs)
        return None

    def build_tree(self) -> None:
        self.result = self.perform(LINK)

    def convert_whiteouts_in_tree(self) -> None:
        self.result = self.perform(CONVERT_WHITEOUTS)


class HardlinkStrategy(Strategy):
    pooled_triggers = frozenset({LINK, CONVERT_WHITEOUTS})

    def layer_need(self, writable: bool, survey: LayerSurvey, block: int) -> Tuple[int, int]:
        """Every directory is made anew; a writable layer's files are copies."""
        inodes = survey.directories + (survey.copy_inodes if writable else 0)
        return inodes, survey.directory_bytes + (survey.copy_bytes if writable else 0)

    def task(self, record: LayerRecord, conv: Conversion, ancestor_links: List[str]) -> LayerTask:
        return HardlinkTask(record, conv.paths, ancestor_links)

    def work_in_pool(self, pool: concurrent.futures.ProcessPoolExecutor, jobs: int, trigger: str,
                     tasks: List[LayerTask]) -> None:
        """The link wave in two rounds (the module's docstring); other waves as every strategy's."""
        if trigger != LINK:
            super().work_in_pool(pool, jobs, trigger, tasks)
            return
        starts = run_in_chunks(pool, jobs, [
            (linker.start_layer, (t.src, t.paths.temp_tree, t.id, t.record.writable,
                                  None if t.record.writable else SPLIT_DEPTH)) for t in tasks])
        parts = [(t, rel) for t, (ok, value) in zip(tasks, starts) if ok for rel in value[1]]
        done = run_in_chunks(pool, jobs, [(linker.link_part, (t.src, t.paths.temp_tree, t.id, rel))
                                          for t, rel in parts])
        by_layer: Dict[str, List[Tuple[bool, StepResult]]] = {}
        for (t, _rel), outcome in zip(parts, done):
            by_layer.setdefault(t.id, []).append(outcome)
        for task, (ok, value) in zip(tasks, starts):
            outcomes = by_layer.get(task.id, [])
            failed = next((v for good, v in outcomes if not good), None) if ok else value
            if failed is not None:
                task.prepared = (False, failed)
            else:
                task.prepared = (True, linker.merge(value[0], [v for _good, v in outcomes]))
