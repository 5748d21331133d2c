"""The methods of the studies, written once and registered by name (a support module, not a script).

A study trains its models, wraps each in a `Cell` (the model, its last state, the training's record, the data, the
arguments, the seed) and asks `run_methods(cell, names)` for the rows of the methods it names; each registered method
is a function `Cell -> list[Row]`, so a new method is one `@register` here and one name in an experiment file.
`Row` is the one row schema: the fields every table reads, then what is specific to the method; the JSON row is
`Row.as_dict()`. Registered (`METHODS`; the clean-up and CIFAR-10N studies name them, `pretrained.py` runs its
baselines through them):

    none, best_epoch     the model at its last / its val-best epoch (early stopping, the baseline to beat)
    oracle               a model trained on the clean labels, its val-best epoch (the ceiling)
    oracle+refine        that model fine-tuned as the clean-up fine-tunes (augmented views; val picks the length)
    cleanups             sap, then sap+<mode> per refine mode and audit, the same from the val-best epoch
                         (best+...), and sap+refine (RefineConfig()'s val-best mode): `sap_and_cleanups`
    refine               the clean-up without SAP: the uncorrected model's audit, then `refine`
    finetune_trusted     fine-tuning on SAP's trusted samples alone (lr and length picked on val)
    scrub                SCRUB with the realistic forget set (SAP's audit's suspects; `peers.py`)
    sap_paper, sap_loss, sap_30   SAP with other settings than SAPConfig()'s (`SAP_VARIANTS`)

`sap_row` is the `sap` row of the studies on their own models and settings (`pretrained.py`, `defaults.py`),
`refine_row` the clean-up row; `sap_refine_row` is `sap+refine` with the `--refine_*` arguments of
`add_refine_arguments` (`pretrained.py`). SSD and SCRUB themselves live in `peers.py`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import common
from audits import audit_ap, dynamics_audit_of, dynamics_diagnostics, shift_audit
from common import DYNAMICS_WINDOWS, PAPER_SAP, TensorExamples, accuracy, fit_diagnostics, refine_arguments, val_metric


# --------------------------------------------------------------------------------------------
# The registry: one row schema, one method signature
# --------------------------------------------------------------------------------------------


#: `Row`'s named fields (the JSON row's keys besides `specific`'s).
ROW_FIELDS = ("method", "test_accuracy", "val_accuracy", "noisy_fit", "purity", "cost_epochs", "seconds")


@dataclass
class Row:
    """One method's result on one cell, as `results/<study>.json` holds it (`as_dict`).

    The fields the tables read are named; what only some methods report (the alpha, the chosen mode, the trials of
    a search) is in `specific` and sits beside them in the JSON row. A field left None was not measured and is not
    in the row. A row made by `of` keeps its dict's key order in `as_dict` (the JSON reads as the method wrote it)."""

    method: str
    test_accuracy: Optional[float] = None
    val_accuracy: Optional[float] = None
    noisy_fit: Optional[float] = None
    purity: Optional[float] = None
    cost_epochs: Optional[float] = None
    seconds: Optional[float] = None
    specific: dict[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, row: dict[str, Any]) -> Row:
        """A row dict (as `sap_row`, `refine_row` and the JSON hold it) as a `Row`."""
        named = set(ROW_FIELDS)
        return cls(
            **{k: v for k, v in row.items() if k in named},
            specific={k: v for k, v in row.items() if k not in named},
            order=tuple(row),
        )

    def as_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in ROW_FIELDS if getattr(self, name) is not None}
        values.update(self.specific)
        first = [key for key in self.order if key in values]
        return {key: values[key] for key in [*first, *(key for key in values if key not in first)]}


@dataclass
class Cell:
    """One trained model of a study (one setting or label set, one seed) and what every method reads.

    `last` is the model's state after training: each method starts from it and `run_methods` puts it back after each.
    `trained` is `common.train_from_scratch`'s record (`best`: state, epoch, val_accuracy; `history`; `margins`);
    `data` the study's tensors (train_x/train_y/clean_y/is_noisy, val_*, test_*); `args` the study's arguments;
    `sap_config` / `sap_audit` how `sap` corrects (default `SAPConfig(batch_size=500)`, with the label audit);
    `clean_labels`: the model was trained on the clean labels (what `oracle` and `oracle+refine` need)."""

    model: Any
    last: dict
    trained: dict[str, Any]
    data: dict[str, Any]
    args: argparse.Namespace
    seed: int
    sap_config: Any = None
    sap_audit: bool = True
    clean_labels: bool = False
    _sap: Optional[dict[str, Any]] = field(default=None, repr=False)

    @property
    def sap(self) -> dict[str, Any]:
        """`sap_row` of the last state, made once for every method that starts from SAP's model."""
        if self._sap is None:
            self._sap = sap_row(self.model, self.last, self.data, self.sap_config, audit=self.sap_audit)
        return self._sap


Method = Callable[[Cell], list[Row]]
METHODS: dict[str, Method] = {}
#: The methods of a cell trained on the clean labels (`Cell(clean_labels=True)`): a study trains that cell itself,
#: so they are not among the methods its `--methods` offers (`noisy_label_methods`).
CLEAN_LABEL_METHODS = ("oracle", "oracle+refine")


def register(name: str) -> Callable[[Method], Method]:
    """Register a method under `name` (a study's experiment file names it)."""

    def add(method: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = method
        return method

    return add


def noisy_label_methods() -> list[str]:
    """The registered methods a study's `--methods` offers: all but `CLEAN_LABEL_METHODS`."""
    return [name for name in METHODS if name not in CLEAN_LABEL_METHODS]


def run_methods(cell: Cell, names: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON rows of the methods `names` on `cell`, in that order; the model is left at `cell.last`."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: the registered ones are {sorted(METHODS)}.")
    wrong = [name for name in names if (name in CLEAN_LABEL_METHODS) != cell.clean_labels]
    if wrong:
        trained = "the clean" if cell.clean_labels else "noisy"
        raise ValueError(f"methods {wrong} do not apply to a model trained on {trained} labels (Cell.clean_labels).")
    rows = []
    for name in names:
        cell.model.load_state_dict(cell.last)
        rows += [row.as_dict() for row in METHODS[name](cell)]
    cell.model.load_state_dict(cell.last)
    return rows


# --------------------------------------------------------------------------------------------
# sap and the clean-up: the rows of every study
# --------------------------------------------------------------------------------------------


def sap_row(
    model: Any, state: dict, data: dict[str, Any], config: Any = None, method: str = "sap", audit: bool = True
) -> dict[str, Any]:
    """The `sap` method of every study: `sap_correct(config)` (default `SAPConfig()`, batches of 500) of `state`, alpha
    on the clean val split; with `audit`, the corrected model's label audit (`views="shift"`) too. Returns
    `{"row", "state" (corrected), "trusted" (indices), "audit"}`; the model is left at `state`.

    The row: test/val accuracy, the alphas and the settings that chose them, the trusted samples' number and purity,
    selection seconds, `seconds` (the correction and the audit), the fit diagnostics, and with `audit` its average
    precision against the true errors and its number of suspects."""
    import torch

    from sap_hf import Runtime, SAPConfig, sap_correct

    model.load_state_dict(state)
    clock = time.perf_counter()
    config = config or SAPConfig(batch_size=500)
    train_set = TensorExamples(data["train_x"], data["train_y"])
    result = sap_correct(
        model, train_set, config=config, evaluate_fn=val_metric(data), runtime=Runtime(show_progress=False)
    )
    trusted = torch.as_tensor(result.trusted_indices, dtype=torch.long)
    row = dict(
        method=method,
        test_accuracy=accuracy(model, data["test_x"], data["test_y"]),
        val_accuracy=result.final_metrics["accuracy"],
        alpha=result.alpha,
        kind_alphas=result.kind_alphas,
        rule=config.selection_rule,
        trusted_per_class=config.trusted_per_class,
        alpha_scope=config.alpha_scope,
        num_trusted=result.num_trusted,
        purity=float((data["train_y"][trusted] == data["clean_y"][trusted]).float().mean()),
        selection_seconds=result.timings.get("selection"),
        **fit_diagnostics(model, data),
    )
    found = shift_audit(model, data) if audit else None
    if found is not None:
        row.update(audit_ap=audit_ap(found, data), audit_suspected=found.num_suspected)
    row["seconds"] = time.perf_counter() - clock
    out = {"row": row, "state": copy.deepcopy(model.state_dict()), "trusted": trusted, "audit": found}
    model.load_state_dict(state)
    return out


def refine_row(
    model: Any,
    data: dict[str, Any],
    audit: Any,
    config: Any,
    *,
    method: str,
    refine_batch_size: int,
    seed: int,
    scratch: str,
    schedule: str = "cosine",
    audit_after: bool = True,
) -> dict[str, Any]:
    """The clean-up method of every study: `sap_hf.refine(config)` of the model as it is, with `audit`'s suspects.

    The row (the model is left refined): test/val accuracy, the chosen mode, lr and length, `cost_epochs`, the kept /
    removed / relabelled counts of the chosen mode (`examples`), the audit's suspects and their precision and recall
    against the true errors, the val grid (`trials`), `noisy_fit`; with `audit_after`, the refined model's own audit
    AP (`audit_ap_after`, one more pass)."""
    from sap_hf import refine
    from sap_hf.runtime.passes import Runtime

    clock = time.perf_counter()
    refined = refine(
        model,
        TensorExamples(data["train_x"], data["train_y"]),
        audit,
        val_metric(data),
        config,
        args=refine_arguments(scratch, refine_batch_size, seed, schedule),
        runtime=Runtime(show_progress=False),
    )
    flagged, noisy = audit.suspected, data["is_noisy"][audit.indices]
    row = dict(
        method=method,
        test_accuracy=accuracy(model, data["test_x"], data["test_y"]),
        val_accuracy=refined.final_metrics["accuracy"],
        refine_mode=refined.mode,
        lr=refined.learning_rate,
        refine_epochs=refined.epochs,
        cost_epochs=refined.cost_epochs,
        examples=refined.examples.get(refined.mode),
        audit_ap=audit_ap(audit, data),
        audit_suspected=int(flagged.sum()),
        audit_precision=float((flagged & noisy).sum() / max(1, int(flagged.sum()))),
        audit_recall=float((flagged & noisy).sum() / max(1, int(noisy.sum()))),
        trials=[
            {
                "mode": t["mode"],
                "lr": t["learning_rate"],
                "epochs": t["epochs"],
                "val": round(t["metrics"]["accuracy"], 4),
            }
            for t in refined.trials
        ],
        **fit_diagnostics(model, data),
    )
    if audit_after:
        row["audit_ap_after"] = audit_ap(shift_audit(model, data), data)
    row["seconds"] = time.perf_counter() - clock
    return row


def sap_and_cleanups(
    cell: Cell, sap: dict[str, Any], prefix: str, modes: Sequence[str], augments: Sequence[bool], scratch: str
) -> list[dict[str, Any]]:
    """`<prefix>sap` (`sap`: `sap_row` of the start state), then `<prefix>sap+<mode>` (`refine_row`) for each mode.

    Each clean-up starts from the SAP model and a label audit of `cell.args.audits`: `shift` (the SAP model's,
    `views="shift"`) or one of `DYNAMICS_WINDOWS` (`dynamics_audit` of the training's margins, the window from its
    val-best epoch; rows named `...@aum`, `...@aum2best`); `sap_hf.refine` in that one mode, lr in {lr, 2 lr}, cosine
    over the largest of `--refine_epochs`, val after each of them; once per value of `augments`
    (`RefineConfig.augment`; rows without augmentation are named `<prefix>sap+<mode>-noaug`)."""
    from sap_hf import RefineConfig

    args, trained = cell.args, cell.trained
    rows = [dict(sap["row"], method=f"{prefix}sap")]
    found = {"shift": sap["audit"]}
    for kind in [a for a in args.audits if a in DYNAMICS_WINDOWS]:
        if "margins" not in trained:
            raise ValueError(
                f"audits=[{kind!r}] needs the training's margins (train_from_scratch records them): retrain."
            )
        found[kind] = dynamics_audit_of(kind, sap["audit"], trained["margins"], trained["best"]["epoch"])
    runs = [(mode, augment, audit) for audit in args.audits for augment in augments for mode in modes]
    for mode, augment, audit in runs:
        cell.model.load_state_dict(sap["state"])
        config = RefineConfig(
            mode=mode, learning_rates=[args.lr, 2 * args.lr], epochs=list(args.refine_epochs), augment=augment
        )
        method = f"{prefix}sap+{mode}{'' if augment else '-noaug'}{'' if audit == 'shift' else '@' + audit}"
        rows.append(
            refine_row(
                cell.model,
                cell.data,
                found[audit],
                config,
                method=method,
                refine_batch_size=args.refine_batch_size,
                seed=cell.seed,
                scratch=scratch,
            )
        )
    return rows


@register("cleanups")
def cleanups(cell: Cell) -> list[Row]:
    """sap, then sap+<mode> for --modes x --augment x --audits, the same from the val-best epoch, sap+refine.

    The rows: `sap_and_cleanups` from the last state (`--modes` x `--augment`) and from the val-best state (`best+`,
    `--best_modes`), each with the audits of `--audits`, then `default_cleanup_rows`. Reads `--lr`,
    `--refine_epochs`, `--refine_batch_size`."""
    args = cell.args
    if not cell.sap_audit:
        raise ValueError("cleanups starts from SAP's label audit: a Cell with sap_audit=True.")
    with tempfile.TemporaryDirectory() as scratch:
        rows = sap_and_cleanups(cell, cell.sap, "", args.modes, [bool(a) for a in args.augment], scratch)
        if args.best_modes:
            best = sap_row(cell.model, cell.trained["best"]["state"], cell.data, cell.sap_config, "best+sap")
            rows += sap_and_cleanups(cell, best, "best+", args.best_modes, [True], scratch)
    return [Row.of(row) for row in rows + default_cleanup_rows(rows)]


@register("none")
def none(cell: Cell) -> list[Row]:
    """The model at its last epoch, with the training-dynamics diagnostics: what training alone gives."""
    data = cell.data
    row = dict(
        method="none",
        test_accuracy=accuracy(cell.model, data["test_x"], data["test_y"]),
        val_accuracy=cell.trained["history"][-1],
        **fit_diagnostics(cell.model, data),
        **dynamics_diagnostics(cell.trained, data),
    )
    return [Row.of(row)]


@register("best_epoch")
def best_epoch(cell: Cell) -> list[Row]:
    """The model at its val-best epoch: early stopping, the baseline every correction has to beat."""
    best, data = cell.trained["best"], cell.data
    cell.model.load_state_dict(best["state"])
    row = dict(
        method="best_epoch",
        best_epoch=best["epoch"],
        test_accuracy=accuracy(cell.model, data["test_x"], data["test_y"]),
        val_accuracy=best["val_accuracy"],
        **fit_diagnostics(cell.model, data),
    )
    return [Row.of(row)]


@register("oracle")
def oracle(cell: Cell) -> list[Row]:
    """`best_epoch` of a cell trained on the clean labels: the ceiling."""
    return [replace(row, method="oracle") for row in best_epoch(cell)]


def default_cleanup_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`sap+refine` / `best+sap+refine`: what `RefineConfig()` (mode="best") gives, the val-best of its modes' rows.

    `refine` tries the modes from the same start with the same seeds and keeps the first best on val, so this
    pick equals a `mode="best"` run; its cost is the sum of the modes' costs. `-noaug`: the same without augmentation.
    """
    from sap_hf.audit.cleanup import BEST_MODES

    picked = []
    suffixes = [aug + audit for audit in ("", *(f"@{a}" for a in DYNAMICS_WINDOWS)) for aug in ("", "-noaug")]
    for prefix, suffix in [(p, s) for p in ("", "best+") for s in suffixes]:
        tried = [r for mode in BEST_MODES for r in rows if r["method"] == f"{prefix}sap+{mode}{suffix}"]
        if len(tried) == len(BEST_MODES):
            chosen = max(tried, key=lambda r: r["val_accuracy"])  # max keeps the first of equals, as refine does
            picked.append(
                dict(
                    chosen,
                    method=f"{prefix}sap+refine{suffix}",
                    chosen_mode=chosen["refine_mode"],
                    cost_epochs=sum(r["cost_epochs"] for r in tried),
                )
            )
    return picked


@register("oracle+refine")
def clean_label_cleanup(cell: Cell) -> list[Row]:
    """The clean-up's fine-tuning of a clean-label model on the clean labels: the ceiling for sap+refine.

    Augmented views, lr in {lr, 2 lr}, cosine, val picks the length: what `sap+refine` adds to its model, here on a
    cell trained on the clean labels."""
    import torch

    from sap_hf import RefineConfig, refine
    from sap_hf.audit.labels import LabelAudit
    from sap_hf.runtime.passes import Runtime

    data, args, n = cell.data, cell.args, len(cell.data["clean_y"])
    trusting = LabelAudit(
        indices=torch.arange(n),
        given=data["clean_y"],
        probs=torch.nn.functional.one_hot(data["clean_y"], int(data["clean_y"].max()) + 1).double(),
        scores=torch.ones(n, dtype=torch.float64),
        suspected=torch.zeros(n, dtype=torch.bool),
    )
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = refine(
            cell.model,
            TensorExamples(data["train_x"], data["clean_y"]),
            trusting,
            lambda m: {"accuracy": accuracy(m, data["val_x"], data["val_y"])},
            RefineConfig(mode="remove", learning_rates=[args.lr, 2 * args.lr], epochs=list(args.refine_epochs)),
            args=refine_arguments(scratch, args.refine_batch_size, cell.seed),
            runtime=Runtime(show_progress=False),
        )
    row = dict(
        method="oracle+refine",
        test_accuracy=accuracy(cell.model, data["test_x"], data["test_y"]),
        val_accuracy=result.final_metrics["accuracy"],
        lr=result.learning_rate,
        refine_epochs=result.epochs,
        cost_epochs=result.cost_epochs,
        seconds=time.perf_counter() - clock,
    )
    return [Row.of(row)]


@register("refine")
def refine_without_sap(cell: Cell) -> list[Row]:
    """The clean-up without SAP: the uncorrected model's audit (`views="shift"`), then `RefineConfig()`'s modes."""
    from sap_hf import RefineConfig

    args = cell.args
    config = RefineConfig(learning_rates=[args.lr, 2 * args.lr], epochs=list(args.refine_epochs))
    with tempfile.TemporaryDirectory() as scratch:
        audit = shift_audit(cell.model, cell.data)
        row = refine_row(
            cell.model,
            cell.data,
            audit,
            config,
            method="refine",
            refine_batch_size=args.refine_batch_size,
            seed=cell.seed,
            scratch=scratch,
        )
    return [Row.of(row)]


@register("finetune_trusted")
def finetune_trusted(cell: Cell) -> list[Row]:
    """Fine-tuning on SAP's trusted samples alone (`common.finetune_grid`: --ft_lrs x --ft_epochs, val picks)."""
    data, trusted = cell.data, cell.sap["trusted"]
    clock = time.perf_counter()
    ft = common.finetune_grid(
        cell.model, cell.last, data["train_x"][trusted], data["train_y"][trusted], data, cell.args, cell.seed
    )
    row = dict(
        method="finetune_trusted",
        test_accuracy=ft["test_accuracy"],
        val_accuracy=ft["val_accuracy"],
        lr=ft["lr"],
        ft_epochs=ft["epochs"],
        noisy_fit=ft["noisy_fit"],
        clean_fit=ft["clean_fit"],
        seconds=time.perf_counter() - clock,
    )
    return [Row.of(row)]


@register("scrub")
def scrub(cell: Cell) -> list[Row]:
    """SCRUB (`peers.py`), realistic forget set: SAP's audit's suspects forgotten, its trusted samples retained."""
    from peers import peer_rows

    sap = cell.sap
    rows = peer_rows(
        cell.model,
        cell.data,
        trusted_indices=sap["trusted"].tolist(),
        suspects=sap["audit"].suspected_indices(),
        args=cell.args,
        seed=cell.seed,
        methods=("scrub",),
        forget_sets=("realistic",),
    )
    return [Row.of(row) for row in rows]


#: SAP with other settings than `SAPConfig()`'s, to check the defaults on real noise (registered by name).
SAP_VARIANTS: dict[str, dict[str, Any]] = {
    "sap_paper": PAPER_SAP,  # the paper's: loss rule, 100 per class, one alpha over 1 ... 1e7
    "sap_loss": {"selection_rule": "loss"},  # SAPConfig() but the plain loss ranks the trusted samples
    "sap_30": {"trusted_per_class": 30},  # SAPConfig() with 30 trusted samples per class instead of 10
}


def sap_variant(name: str, settings: dict[str, Any]) -> Method:
    """The method `name`: `sap_row` of the last state with `SAPConfig(batch_size=500, **settings)`."""

    def method(cell: Cell) -> list[Row]:
        from sap_hf import SAPConfig

        config = SAPConfig(**{"batch_size": 500, **settings})
        return [Row.of(sap_row(cell.model, cell.last, cell.data, config, name)["row"])]

    method.__doc__ = f"SAP of the last state with SAPConfig(batch_size=500, **{settings})."
    return method


for _name, _settings in SAP_VARIANTS.items():
    register(_name)(sap_variant(_name, _settings))


# --------------------------------------------------------------------------------------------
# sap+refine: SAP's model, its label audit, then the clean-up (`sap_hf.refine`)
# --------------------------------------------------------------------------------------------


def add_refine_arguments(parser: argparse.ArgumentParser, epochs: list[int] | None = None) -> None:
    """The `--refine_*` arguments of `sap_refine_row` (the recipe's refine settings by default; `epochs`: another
    default length grid, for a benchmark that cannot afford the recipe's)."""
    parser.add_argument(
        "--refine_modes",
        nargs="+",
        default=["remove", "relabel"],
        choices=["remove", "relabel", "soft", "pseudo"],
        help="sap+refine: modes tried (RefineConfig(mode=[...]), val picks)",
    )
    parser.add_argument(
        "--refine_lrs",
        nargs="+",
        type=float,
        default=None,
        help="sap+refine: learning rates (default: --lr and twice it, as SAPTrainer.refine's default)",
    )
    parser.add_argument("--refine_epochs", nargs="+", type=int, default=list(epochs or [1, 2, 3, 4, 6, 8]))
    parser.add_argument(
        "--refine_schedule",
        default="cosine",
        choices=["constant", "cosine"],
        help="TrainingArguments.lr_scheduler_type of the clean-up runs",
    )
    parser.add_argument("--refine_batch_size", type=int, default=64)
    parser.add_argument(
        "--refine_augment",
        type=int,
        default=0,
        choices=[0, 1],
        help="RefineConfig.augment (1: flip + shift on every image; the recorded rows ran without)",
    )
    parser.add_argument(
        "--refine_views",
        default="shift",
        choices=["image", "shift"],
        help="sap+refine: the label audit's views (sap_hf.audit_labels(views=...))",
    )


def sap_refine_row(
    model: Any,
    sap_state: dict,
    sap: dict[str, Any],
    run: dict[str, Any],
    args: argparse.Namespace,
    method: str = "sap+refine",
    audit: Any = None,
) -> dict[str, Any]:
    """`sap+refine` with the `--refine_*` arguments: audit the training labels with `sap`'s model, then the clean-up
    (`refine_row`: RefineConfig(mode=--refine_modes), choices on val).

    `sap` is the row of the model in `sap_state` (its identifying keys are copied); `method` names the row (e.g.
    'refine' when `sap_state` is the uncorrected model); `audit`: that model's `audit_labels` when already made.
    The audit's precision/recall against the hidden clean labels are reported, never used.
    """
    from sap_hf import RefineConfig, Runtime, audit_labels

    model.load_state_dict(sap_state)
    if audit is None:
        audit = audit_labels(
            model, run["train_set"], views=args.refine_views, runtime=Runtime(batch_size=1000, show_progress=False)
        )
    config = RefineConfig(
        mode=list(args.refine_modes),
        learning_rates=list(args.refine_lrs),
        epochs=list(args.refine_epochs),
        augment=bool(args.refine_augment),
    )
    keys = ("setting", "noise", "seed", "epochs", "rule", "trusted_per_class", "alpha_scope", "kind_alphas", "alpha")
    with tempfile.TemporaryDirectory() as scratch:
        row = refine_row(
            model,
            run["data"],
            audit,
            config,
            method=method,
            refine_batch_size=args.refine_batch_size,
            seed=sap["seed"],
            scratch=scratch,
            schedule=args.refine_schedule,
            audit_after=False,
        )
    return {**{k: sap[k] for k in keys if k in sap}, **row, "sap_val_accuracy": sap["val_accuracy"]}
