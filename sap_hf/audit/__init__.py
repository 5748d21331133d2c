"""What the corrected model says about the labels: scores, the audit, its report, and the clean-up fine-tune."""

from .cleanup import RefineConfig, RefineResult, refine
from .labels import (
    FILTERS,
    SCORE_METHODS,
    VIEWS,
    LabelAudit,
    audit_labels,
    dynamics_audit,
    flag_label_issues,
    label_quality_scores,
)


__all__ = [
    "FILTERS",
    "SCORE_METHODS",
    "VIEWS",
    "LabelAudit",
    "RefineConfig",
    "RefineResult",
    "audit_labels",
    "dynamics_audit",
    "flag_label_issues",
    "label_quality_scores",
    "refine",
]
