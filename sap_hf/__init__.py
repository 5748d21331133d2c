"""sap_hf: SAP (Scaled Activation Projection) label-noise correction for Hugging Face vision Transformers.

Kodge et al., "SAP: Corrective Machine Unlearning with Scaled Activation Projection for Label
Noise Robustness", AAAI 2025 (arXiv 2403.08618).
"""

from .api import SAPResult, sap_correct, sap_project
from .audit.labels import LabelAudit, audit_labels, flag_label_issues, label_quality_scores
from .core.config import SAPConfig
from .core.evaluation import accuracy_evaluator, evaluate_accuracy
from .losses import LossConfig, RobustLoss
from .core.projection import (
    Eigenbasis,
    eigendecompose,
    energy_ratios,
    plan_projection,
    project_weight,
    projection_matrix,
    scaled_importance,
    write_weights,
)
from .audit.cleanup import RefineConfig, RefineResult, refine
from .core.search import AlphaSearchResult, search_alpha
from .core.stats import ActivationStats, collect_statistics
from .core.targets import TargetGroup, classifier_names, find_target_modules
from .trainer import SAPTrainer
from .core.selection import TrustedSelection, select_trusted

__version__: str = next(  # importlib.metadata.version("sap_hf"), one source (pyproject.toml); "0+unknown" when not installed
    (dist.version for dist in __import__("importlib.metadata", fromlist=["distributions"]).distributions(name="sap_hf")),
    "0+unknown",
)

__all__ = [
    "ActivationStats",
    "AlphaSearchResult",
    "Eigenbasis",
    "LossConfig",
    "RobustLoss",
    "LabelAudit",
    "RefineConfig",
    "RefineResult",
    "SAPConfig",
    "SAPResult",
    "SAPTrainer",
    "TargetGroup",
    "TrustedSelection",
    "accuracy_evaluator",
    "audit_labels",
    "classifier_names",
    "collect_statistics",
    "eigendecompose",
    "energy_ratios",
    "evaluate_accuracy",
    "find_target_modules",
    "flag_label_issues",
    "label_quality_scores",
    "plan_projection",
    "project_weight",
    "projection_matrix",
    "refine",
    "sap_correct",
    "sap_project",
    "scaled_importance",
    "search_alpha",
    "select_trusted",
    "write_weights",
]
