"""How alphas read in logs, model cards, plots and the recipe's summary line: one spelling everywhere.

A leaf module (no sap_hf imports), so the card (`hub`), the plot (`plotting`) and the scripts
can all use it without pulling in the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional


def format_alpha(alpha: Optional[float]) -> str:
    """`1e+04` style for a value, `unchanged` for None (no alpha beat the unchanged model)."""
    return "unchanged" if alpha is None else f"{alpha:g}"


def format_kind_alphas(kind_alphas: Mapping[str, Optional[float]]) -> str:
    """`attention=100, mlp=1000, classifier=unchanged`: per-kind alphas."""
    return ", ".join(f"{kind}={format_alpha(alpha)}" for kind, alpha in kind_alphas.items())


def format_result_alphas(result: Any) -> str:
    """What a `SAPResult` wrote: its per-kind alphas (alpha_scope='per_kind'), else its shared alpha."""
    if result.kind_alphas:
        return format_kind_alphas(result.kind_alphas)
    return format_alpha(result.alpha)
