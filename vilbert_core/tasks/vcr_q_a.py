"""VCR Q->A alone (the multi-task reference's VCR_Q-A): the answer among 4, on the `vcr` shards."""

from __future__ import annotations

from vilbert_core.tasks.vcr import VCRStageTask


class VCRQATask(VCRStageTask):
    """Choose the answer."""

    name = "vcr_q_a"
    stage = "q_a"
    stage_title = "Q->A"


TASK = VCRQATask()
