"""The hardlink strategy (the default): each layer's overlay2 tree is built beside the untouched aufs data.

Every entry is hardlinked (a container's writable layer is copied: overlay2 writes into it in place), so
aufs/ stays exactly as it was until cleanup, and a rollback only removes what was built.  The link and whiteout
steps walk the layers; the runner hands them to worker processes.  A wave's link work goes out in pieces of
about ``PART_ENTRIES`` entries, so that one big layer keeps every worker busy (``share_out``): a worker links
a layer until it has done that many, and hands back the subtrees it did not enter, which go out again
(``linker.start_layer``, ``linker.link_part``).  A layer is ``linked`` only once all of its pieces are done
and the wave's ``syncfs`` has made them durable.
"""

from __future__ import annotations

import concurrent.futures
from typing import Dict, List, Optional, Tuple

from migrations_state.machine import COMMIT, CONVERT_WHITEOUTS, LINK, WRITE_LOWERS
from migrations_state.schema import LayerRecord
from migrator import interrupts
from migrator.scan.survey import LayerSurvey
from migrator.strategies import linker
from migrator.strategies.base import Conversion, LayerTask, Outcome, Strategy, Work, run_chunk

PART_ENTRIES = 4000  # a worker links about this many entries of a layer, then hands the rest back as parts


class HardlinkTask(LayerTask):
    @property
    def src(self) -> str:
        return self.paths.aufs_layer(self.id)

    @property
    def lower_dirs(self) -> List[str]:
        """The ancestors' aufs data, nearest first (never changed by this strategy)."""
        return [self.paths.aufs_layer(a) for a in self.record.ancestor_ids]

    def work(self, trigger: str) -> Optional[Work]:
        if trigger == LINK:
            return linker.build_layer_tree, (self.src, self.paths.temp_tree, self.id, self.record.writable,
                                             self.lower_dirs)
        if trigger == CONVERT_WHITEOUTS:
            return linker.convert_whiteouts, (self.src, self.paths.temp_tree, self.id, self.whiteout_dirs,
                                              self.lower_dirs)
        return super().work(trigger)

    def build_tree(self) -> None:
        self.result = self.perform(LINK)

    def convert_whiteouts_in_tree(self) -> None:
        self.result = self.perform(CONVERT_WHITEOUTS)


class HardlinkStrategy(Strategy):
    task_class = HardlinkTask
    pooled_triggers = frozenset({LINK, CONVERT_WHITEOUTS, WRITE_LOWERS, COMMIT})
    pool_from_layers = 1

    def layer_need(self, writable: bool, survey: LayerSurvey, block: int) -> Tuple[int, int]:
        """Every directory is made anew; a writable layer's files are copies."""
        inodes = survey.directories + (survey.copy_inodes if writable else 0)
        return inodes, survey.directory_bytes + (survey.copy_bytes if writable else 0)

    def task(self, record: LayerRecord, conv: Conversion, ancestor_links: List[str]) -> LayerTask:
        return self.task_class(record, conv.paths, ancestor_links)

    def pooled_outcomes(self, pool: concurrent.futures.ProcessPoolExecutor, jobs: int, trigger: str,
                        tasks: List[LayerTask]) -> List[Outcome]:
        """The link wave shared out as the module's docstring says; other waves as every strategy's."""
        if trigger != LINK:
            return super().pooled_outcomes(pool, jobs, trigger, tasks)
        outcomes = share_out(pool, jobs, tasks)
        return [outcomes[task] for task in tasks]


def share_out(pool: concurrent.futures.ProcessPoolExecutor, jobs: int, tasks: List[LayerTask]
              ) -> Dict[LayerTask, Outcome]:
    """Link every task's layer in the workers, ``PART_ENTRIES`` entries at a time: a walk that reaches its budget
    leaves the subtrees it did not enter as new pieces of work, handed out as soon as they come back, so the
    workers stay busy until the last piece (no round waits for another).  Small layers go several to a
    chunk.  Each task's outcome: its merged result, or the first error of any of its pieces."""
    found: Dict[LayerTask, List[Outcome]] = {t: [] for t in tasks}
    queue = [(t, (linker.start_layer, (t.src, t.paths.temp_tree, t.id, t.record.writable, PART_ENTRIES,
                                        t.lower_dirs)))
             for t in tasks]
    running: Dict[concurrent.futures.Future, list] = {}
    while queue or running:
        interrupts.check()
        while queue and len(running) < 2 * jobs:
            size = max(1, min(len(queue) // (2 * jobs), 64))
            chunk, queue = queue[:size], queue[size:]
            running[pool.submit(run_chunk, [work for _t, work in chunk])] = chunk
        done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            for (task, _work), (ok, value) in zip(running.pop(future), future.result()):
                found[task].append((ok, value[0] if ok else value))
                if ok:
                    queue.extend((task, (linker.link_part, (task.src, task.paths.temp_tree, task.id, rel,
                                                            PART_ENTRIES, task.lower_dirs))) for rel in value[1])
    outcomes: Dict[LayerTask, Outcome] = {}
    for task, pieces in found.items():
        failed = next((value for ok, value in pieces if not ok), None)
        outcomes[task] = (False, failed) if failed is not None else \
            (True, linker.merge(pieces[0][1], [value for _ok, value in pieces[1:]]))
    return outcomes
