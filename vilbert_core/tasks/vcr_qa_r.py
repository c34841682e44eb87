"""VCR QA->R alone (the multi-task reference's VCR_QA-R): the rationale among 4, given the right answer."""

from __future__ import annotations

from vilbert_core.tasks.vcr import VCRStageTask


class VCRQARTask(VCRStageTask):
    """Choose the rationale."""

    name = "vcr_qa_r"
    stage = "qa_r"
    stage_title = "QA->R"


TASK = VCRQARTask()
