"""The hardlink strategy (the default): each layer's overlay2 tree is built beside the untouched aufs data.

Every entry is hardlinked (a container's writable layer is copied: overlay2 writes into it in place), so
aufs/ stays exactly as it was until cleanup, and a rollback only removes what was built.  The link and whiteout
steps walk the layers; the runner hands them to worker processes.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from migrations_state.machine import CONVERT_WHITEOUTS, LINK
from migrations_state.schema import LayerRecord
from migrator.scan.survey import LayerSurvey
from migrator.strategies import linker
from migrator.strategies.base import Conversion, LayerTask, Strategy, Work


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
