"""sap_hf: SAP (Scaled Activation Projection) label-noise correction for Hugging Face vision Transformers.

Kodge et al., "SAP: Corrective Machine Unlearning with Scaled Activation Projection for Label
Noise Robustness", AAAI 2025 (arXiv 2403.08618).

The names here are the ones most users need; everything else is importable from its module:
`sap_hf.core` (config, math, targets, statistics, selection, search), `sap_hf.runtime` (passes
over data), `sap_hf.utils` (option checks, atomic writes, sample identities), `sap_hf.audit`
(label audit and clean-up), `sap_hf.data`, `sap_hf.losses`, `sap_hf.hub`.
"""

from .api import SAPResult, sap_correct, sap_project
from .audit.cleanup import RefineConfig, refine
from .audit.labels import LabelAudit, audit_labels
from .core.config import SAPConfig
from .core.search import search_alpha
from .core.selection import TrustedSelection, select_trusted
from .core.stats import ActivationStats, collect_statistics
from .evaluation import evaluate_accuracy
from .runtime.passes import Runtime
from .trainer import SAPTrainer


__version__: str = (
    next(  # importlib.metadata.version("sap_hf"), one source (pyproject.toml); "0+unknown" when not installed
        (
            dist.version
            for dist in __import__("importlib.metadata", fromlist=["distributions"]).distributions(name="sap_hf")
        ),
        "0+unknown",
    )
)

__all__ = [
    "ActivationStats",
    "LabelAudit",
    "RefineConfig",
    "Runtime",
    "SAPConfig",
    "SAPResult",
    "SAPTrainer",
    "TrustedSelection",
    "audit_labels",
    "collect_statistics",
    "evaluate_accuracy",
    "refine",
    "sap_correct",
    "sap_project",
    "search_alpha",
    "select_trusted",
]
