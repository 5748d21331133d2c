"""`SAPConfig`: every knob of a SAP correction, in one dataclass.

Follows the TRL convention: each field carries `help` metadata so the same class drives
`HfArgumentParser` (command line and YAML), and `__post_init__` validates user input with
errors that name the field, the bad value and the fix. Validation happens here, before any
model is touched, so a bad config can never leave a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers.utils import logging

from ..utils.checks import check_choice, finite_float, integer, invalid, is_bool, plain_scalar, positive_int
from .projection import validate_alpha
from .selection import SCORERS


logger = logging.get_logger(__name__)

DEFAULT_ALPHAS: tuple[float, ...] = (10.0, 20.0, 30.0, 50.0, 1e2, 2e2, 3e2, 5e2, 1e3, 3e3, 1e4)
"""The default alpha grid: dense where the search settles on memorised ViTs, capped where float32 statistics
stay close to exact (`FLOAT32_ALPHA_LIMIT`)."""
FLOAT32_ALPHA_LIMIT = 1e4
"""The largest alpha that float32 Gram matrices are used at without a warning (benchmarks/studies/cost.md,
'Same weights': the float32 error grows with alpha)."""
TRUSTED_SOURCES: tuple[str, ...] = ("pass", "training")
AUDIT_SOURCES: tuple[str, ...] = ("model", "training")
ACCUMULATION_DTYPES: tuple[str, ...] = ("float32", "float64")
ALPHA_SCOPES: tuple[str, ...] = ("shared", "per_kind")
ALPHA_SEARCHES: tuple[str, ...] = ("bracket", "grid")


@dataclass
class SAPConfig:
    """Configuration of a SAP (Scaled Activation Projection) correction.

    SAP (Kodge et al., AAAI 2025) projects every targeted weight `W` onto the activation space
    of a few trusted samples, `W <- W U diag(lambda) U^T`, with `lambda` the scaled importance of
    each activation direction. The fields below choose which layers, how many trusted samples,
    which scaling `alpha`, and how the activation statistics are accumulated.
    """

    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Which nn.Linear layers to project. None (default): every Linear of the backbone "
                "(attention q/k/v/output and MLP layers of any ViT-family model). A str (Python/YAML) "
                "is a regex that must fully match the module name (on the command line: one value with regex "
                "characters, e.g. '.*(query|value)'); a list is a list of name suffixes; "
                "'all-linear' selects every Linear of the backbone. A pattern that matches no backbone layer is "
                "an error. The classifier head is governed by `project_classifier`; [] (on the command line: '[]') "
                "with it projects the head alone."
            )
        },
    )
    exclude_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Layers never projected: a regex str (full match) or a list of name suffixes."},
    )
    project_classifier: bool = field(
        default=True,
        metadata={"help": "Also project the classification head (its input is the pooled/CLS vector)."},
    )
    alphas: list[float] = field(
        default_factory=lambda: list(DEFAULT_ALPHAS),
        metadata={
            "help": (
                "Grid of scaling factors alpha >= 1 searched on a clean eval set. alpha=1 keeps the raw "
                "energy ratios as importance (strongest shrinkage); large alpha keeps every used direction "
                "(weakest). 'No change' is always a candidate. The default, 10 ... 1e4 (11 values), is dense where "
                "the search settles on memorised ViTs and stops where float32 statistics stay close to exact."
            )
        },
    )
    alpha_scope: str = field(
        default="per_kind",
        metadata={
            "help": (
                "'shared' (the paper): one alpha for every projected layer. 'per_kind' (default): after the shared search, "
                "the attention layers, the MLP layers and the classifier each try every alpha of the grid and "
                "'unchanged' in turn, the other kinds held (a coordinate pass: up to 4x the evaluations). The "
                "shared result stays a candidate, so it is never worse on the eval set. Why: on memorised ViTs the "
                "attention layers want a strong alpha and the MLP layers a mild one, which one shared alpha can only "
                "compromise between (benchmarks/studies/accuracy.md, ablation)."
            )
        },
    )
    alpha_search: str = field(
        default="bracket",
        metadata={
            "help": (
                "How the alphas of the grid are visited; each visit is a full pass over the eval set. 'bracket' "
                "(default): start at the middle of the sorted grid ('unchanged' is its alpha -> inf end) and climb "
                "until the metric has fallen on both sides of the best alpha, for the shared alpha and for each kind "
                "of the per-kind pass: the grid's choice on a unimodal curve with a fraction of the evaluations "
                "(benchmarks/studies/cost.md, 'Correction cost'). 'grid': evaluate every alpha (and every alpha per kind)."
            )
        },
    )
    alpha_search_tolerance: float = field(
        default=0.0025,
        metadata={
            "help": (
                "alpha_search='bracket': the metric must fall by more than this (in the metric's units; accuracy "
                "0.0025 = 0.25 points, 5 of 2,000 eval samples) before a side of the best alpha counts as fallen, "
                "so that small dips of a noisy curve do not stop the climb. 0 stops at the first fall."
            )
        },
    )
    trusted_per_class: int = field(
        default=10,
        metadata={
            "help": (
                "Trusted samples kept per class: the k best-ranked (lowest-score) samples of each class. Few and clean "
                "beats many and mixed: each wrong label among them is projected back in."
            )
        },
    )
    selection_rule: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "How trusted samples are ranked. None (default): 'shift_loss' when trusted_source='pass', 'loss' "
                "(the recorded training loss) when trusted_source='training'. 'loss' (the paper: cross-entropy of the model being "
                "corrected), 'early_loss' (cross-entropy under an earlier checkpoint, given as "
                "`selection_model`, that has not yet memorised the noise), 'shift_loss' (loss averaged "
                "over the image and four copies shifted by 1/28 of its side, 1 pixel at 28x28: no checkpoint "
                "needed, and far purer than 'loss' on a model that memorised the noise). Experimental (never better in "
                "the benchmarks): 'agreement' (loss averaged over flipped views, keeping only samples whose views all "
                "predict the label), 'curvature' (the reference's choice for real noise: how much the loss's input "
                "gradient changes along random +-1e-3 pixel directions, averaged over 10 draws; memorised wrong "
                "labels sit in sharp minima. Costly: 10 forward and backward passes per sample, 5-6x 'shift_loss', "
                "and a training step's memory per batch)."
            )
        },
    )
    selection_subset: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Score only part of the selection data: None (default) scores every example. A number in (0, 1] "
                "is a share of the examples (1 or 1.0: all of them), a whole number > 1 a count (a stream without "
                "len() takes a share only). The examples are drawn at random with `sampling_seed`, the same on "
                "every process; trusted identities stay positions (or keys) of the whole data. The cost of the "
                "selection pass shrinks with the share, while the per_class lowest of a random share of a class are "
                "nearly as clean as those of the whole class as long as the share holds many times per_class samples "
                "of each class."
            )
        },
    )
    trusted_source: str = field(
        default="pass",
        metadata={
            "help": (
                "Where the trusted samples' scores come from: 'pass' (default) scores the selection data with "
                "selection_rule in a pass of its own; 'training' (SAPTrainer only) ranks by the per-example "
                "cross-entropy that SAPTrainer.train() recorded during training (mean over the last "
                "`training_loss_epochs` epochs), with no pass at all. Mislabelled examples are learned late, so "
                "their loss averaged over training stays high even once the model has memorised them."
            )
        },
    )
    training_loss_epochs: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "trusted_source='training': average each example's recorded loss over the last this many epochs "
                "of train(); None (default) averages over every epoch."
            )
        },
    )
    audit_source: str = field(
        default="model",
        metadata={
            "help": (
                "What ranks and flags the labels in SAPTrainer's label audit (and so refine's suspects): 'model' "
                "(default) the corrected model's probabilities; 'training' each example's label margin (p(given) - "
                "max other p) averaged over the epochs SAPTrainer.train() recorded (the area under the margin), "
                "suspected where a two-component mixture puts it with the low margins. Wrong labels are learned late, "
                "so their margin stays low for most of training. Needs a map-style train_dataset; the window is "
                "training_loss_epochs'."
            )
        },
    )
    num_rounds: int = field(
        default=1,
        metadata={"help": "Rounds of SAP: each round re-collects statistics on the projected model."},
    )
    alpha_growth: float = field(
        default=10.0,
        metadata={"help": "Each further round multiplies alpha by this factor (>= 1)."},
    )
    max_tokens_per_sample: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Optional cap on tokens per sequence fed to the statistics (the first/CLS token is always "
                "kept, the rest sampled with `sampling_seed`). None (default) uses every token: exact statistics."
            )
        },
    )
    accumulation_dtype: str = field(
        default="float32",
        metadata={
            "help": (
                "dtype of the accumulated Gram matrices: 'float32' (faster) or 'float64' (exact). float32's rounding "
                "error is amplified by alpha in the low-energy directions, so the weights drift from the exact ones "
                "as alpha grows (benchmarks/studies/cost.md, 'Same weights'); use float64 when large alphas matter. "
                "eigh always runs in float64."
            )
        },
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "Batch size for the statistics, selection and evaluation passes over datasets."},
    )
    sampling_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the token sub-sampling (max_tokens_per_sample), of the curvature rule's random draws and of selection_subset's draw."
        },
    )

    def __post_init__(self) -> None:
        self.target_modules = self._normalise_patterns("target_modules", self.target_modules)
        self.exclude_modules = self._normalise_patterns("exclude_modules", self.exclude_modules)
        self.alphas = _alpha_grid(self.alphas)
        self.trusted_per_class = positive_int("SAPConfig.trusted_per_class", self.trusted_per_class)
        self.num_rounds = positive_int("SAPConfig.num_rounds", self.num_rounds)
        self.batch_size = positive_int("SAPConfig.batch_size", self.batch_size)
        if self.max_tokens_per_sample is not None:
            self.max_tokens_per_sample = positive_int(
                "SAPConfig.max_tokens_per_sample", self.max_tokens_per_sample, "None uses every token."
            )
        self.sampling_seed = integer("SAPConfig.sampling_seed", self.sampling_seed)
        self.selection_subset = _subset_size(self.selection_subset)
        self.trusted_source = check_choice("SAPConfig.trusted_source", self.trusted_source, TRUSTED_SOURCES)
        self.audit_source = check_choice("SAPConfig.audit_source", self.audit_source, AUDIT_SOURCES)
        if self.training_loss_epochs is not None:
            self.training_loss_epochs = positive_int(
                "SAPConfig.training_loss_epochs", self.training_loss_epochs, "None averages over every epoch."
            )
        self.alpha_growth = finite_float("SAPConfig.alpha_growth", self.alpha_growth)
        if self.alpha_growth < 1:
            raise invalid(
                "SAPConfig.alpha_growth",
                self.alpha_growth,
                "use a finite number >= 1 (1 keeps alpha fixed across rounds).",
            )
        tolerance = finite_float("SAPConfig.alpha_search_tolerance", self.alpha_search_tolerance)
        if tolerance < 0:
            raise invalid(
                "SAPConfig.alpha_search_tolerance",
                tolerance,
                "use a finite number >= 0 (in the metric's units, e.g. 0.0025).",
            )
        self.alpha_search_tolerance = tolerance
        self.project_classifier = _flag("project_classifier", self.project_classifier)
        self.alpha_scope = check_choice("SAPConfig.alpha_scope", self.alpha_scope, ALPHA_SCOPES)
        self.alpha_search = check_choice("SAPConfig.alpha_search", self.alpha_search, ALPHA_SEARCHES)
        self.accumulation_dtype = check_choice(
            "SAPConfig.accumulation_dtype", self.accumulation_dtype, ACCUMULATION_DTYPES
        )
        if self.selection_rule is None:
            self.selection_rule = "loss" if self.trusted_source == "training" else "shift_loss"
        self.selection_rule = check_choice("SAPConfig.selection_rule", self.selection_rule, tuple(SCORERS))
        if self.trusted_source == "training" and (self.selection_rule != "loss" or self.selection_subset is not None):
            raise ValueError(
                f"SAPConfig.trusted_source='training' ranks by the recorded training loss, so selection_rule="
                f"{self.selection_rule!r} and selection_subset={self.selection_subset!r} would not be used: leave "
                "selection_rule at None (or 'loss') and selection_subset at None, or use trusted_source='pass'."
            )
        if self.accumulation_dtype == "float32" and max(self.alphas) > FLOAT32_ALPHA_LIMIT:
            # The default grid stops at the limit, so a default never warns. The search scores every alpha
            # as written against "unchanged", so a float32 error at a large alpha can cost it a candidate
            # but never pass unmeasured into the result; sap_project, which measures nothing, can write one.
            logger.warning(
                "SAPConfig: alphas up to %g with accumulation_dtype='float32': float32 Gram matrices carry an error of "
                "about 1e-7 x the largest eigenvalue, which alpha amplifies in the low-energy directions (the "
                "measurements are in benchmarks/studies/cost.md, 'Same weights'). Use accumulation_dtype='float64' for "
                "exact results above alpha=%g.",
                max(self.alphas),
                FLOAT32_ALPHA_LIMIT,
            )

    @staticmethod
    def _normalise_patterns(name: str, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
            values = list(value)
            # From the command line a single regex or 'all-linear' arrives as a one-item list, and [] as '[]'.
            if len(values) == 1 and (values[0] == "all-linear" or _REGEX_ONLY.search(values[0])):
                return [] if values[0] == "[]" else values[0]
            return values
        raise invalid(
            f"SAPConfig.{name}", value, "use a regex string, a list of non-empty module-name suffixes, or None."
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SAPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown SAPConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**values)


_REGEX_ONLY = re.compile(r"[][*+?(){}|^$\\]")
"""Characters no module-name suffix holds: a one-item list with them is a regex (or '[]', the empty list)."""


def _alpha_grid(alphas: Any) -> list[float]:
    """The alpha grid as a list of plain floats, from one value (YAML `alphas: 1e4`, `np.float32(100)`),
    a list/tuple (numpy numbers inside are fine) or a numpy array / tensor."""
    values = alphas.tolist() if callable(getattr(alphas, "tolist", None)) else alphas  # ndarray, tensor, numpy scalar
    if isinstance(values, (str, numbers.Real)):
        values = [values]
    if isinstance(values, Mapping) or not isinstance(values, Iterable):
        raise invalid("SAPConfig.alphas", alphas, "give a list of alphas >= 1, e.g. [1e3, 1e4, 1e5].")
    grid = []
    for value in values:
        if is_bool(value):
            raise invalid(
                "SAPConfig.alphas", alphas, f"{value!r} is a bool, not an alpha; give numbers >= 1, e.g. [1e3, 1e4]."
            )
        grid.append(validate_alpha(plain_scalar(value), "SAPConfig.alphas"))
    if not grid:
        raise invalid("SAPConfig.alphas", alphas, "give at least one alpha >= 1, e.g. [1e3, 1e4, 1e5].")
    return grid


def _subset_size(value: Any) -> Optional[float]:
    """`selection_subset`: None, a share in (0, 1] (1 and 1.0 alike: the whole data), or a whole count > 1 (kept as
    a float, e.g. 14000.0). One rule for ints and floats: the command line and YAML cannot tell 1 from 1.0."""
    if value is None:
        return None
    if is_bool(value) or not isinstance(plain_scalar(value), numbers.Real):
        raise invalid("SAPConfig.selection_subset", value, "use None, a share in (0, 1] or a whole count > 1.")
    size = finite_float("SAPConfig.selection_subset", value)
    if size <= 0 or (size > 1 and size != int(size)):
        raise invalid(
            "SAPConfig.selection_subset",
            value,
            "use None, a share in (0, 1] (e.g. 0.1; 1 = every example) or a whole count > 1 (e.g. 14000).",
        )
    return size


def _flag(name: str, value: Any) -> bool:
    """A bool field, numpy's `bool_` included; anything else raises (`"false"` would be truthy)."""
    if not is_bool(value):
        raise invalid(f"SAPConfig.{name}", value, "use True or False.")
    return bool(plain_scalar(value))
