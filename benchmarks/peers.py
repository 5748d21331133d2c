"""SAP's corrective-unlearning peers SSD and SCRUB (a support module, not a script): `peer_rows` and its
`--peer_*` arguments (`add_peer_arguments`), run on the benchmarks' memorised models by `pretrained.py` and
`cifar10n.py` (and by the archived `accuracy.py --methods peers`) (`methods.py` registers `scrub` for the clean-up studies).

Both methods need a *forget set* (samples to unlearn) and a *retain set*; SAP needs neither. Written from
the papers (no reference code), pure torch on the benchmarks' tensors:

* **SSD** (Foster et al., AAAI 2024, "Fast Machine Unlearning Without Retraining Through Selective Synaptic
  Dampening"). Importance of parameter i over a set S = its diagonal Fisher, the mean over the samples of
  S of the squared per-sample gradient of the cross-entropy loss (`diagonal_fisher`, one forward+backward
  per sample). With I_f over the forget set and I_r over the retain set, every parameter with
  I_f > alpha * I_r is multiplied by beta = min(lambda * I_r / I_f, 1); the others are untouched
  (`ssd_dampen`). The paper's alpha = 10, lambda = 1. Every parameter of the model (weights, biases,
  LayerNorm, embeddings, head) is a candidate, as in the paper.
* **SCRUB** (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning"). A student starts at
  the original model (the frozen teacher). Each epoch: while epoch <= max_epochs ("msteps"), one max pass
  over the forget set that *increases* KL(teacher || student) (loss = -KL); then one min pass over the
  retain set with loss = kl_weight * KL(teacher || student) + ce_weight * CE(student, label). KL at
  temperature T on both sides, scaled by T^2 (distillation convention). AdamW without weight decay (as
  every fine-tuning in these benchmarks; the paper used SGD), batches of `batch_size`.

Forget/retain sets (`peer_rows`):

* `realistic`: forget = the label audit's suspects, most suspicious first (top-k, k picked on val with
  the other hyper-parameters; "all" is a candidate); retain = the recipe's trusted samples. No hidden
  label is used.
* `oracle`: the SAP paper's setting, which uses information a user does not have: forget = a random
  sample of the truly mislabelled training images, retain = a random sample of the correctly labelled
  ones, sizes as in the SAP paper's table (SSD 5,000 retain / 1,000 forget, SCRUB 1,000 / 200 on a
  50,000-image training set, CIFAR-10's) scaled to the training set: 4,000 images -> SSD 400 / 80,
  SCRUB 80 / 16.

Hyper-parameters are picked on the clean validation split (ties to the earlier candidate); "no change"
is the first candidate. Cost (`cost_epochs`): training-epoch equivalents, counted in per-sample passes
over the model: a forward+backward of one sample = 1, a forward only (teacher outputs, validation
evaluations) = 1/3 (a backward costs about two forwards); the sum divided by the number of training
images. `cost_epochs` is the whole method with its validation search (every candidate trained and
evaluated), `cost_epochs_final` the chosen candidate alone (its Fisher passes / its SCRUB steps, no
evaluation). Not counted: what produced the inputs (the trusted selection, SAP and its label audit,
which the realistic sets need: their cost is SAP's).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import common


#: Hyper-parameter grids (argument name -> default). Forget sizes: 0 = every available sample ("all").
PEER_DEFAULTS: dict[str, Any] = {
    "ssd_alphas": [3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0],
    "ssd_lambdas": [0.1, 1.0],
    "ssd_forget_sizes": [10, 20, 50, 100, 400, 0],
    "scrub_lrs": [3e-4, 1e-3, 3e-3],
    "scrub_max_epochs": [1, 3],
    "scrub_epochs": [1, 2, 3, 5, 8, 12, 20],
    "scrub_forget_sizes": [20, 100, 0],
    "scrub_temperature": 4.0,
    "scrub_kl_weight": 1.0,
    "scrub_ce_weight": 1.0,
    "scrub_batch_size": 32,
}
QUICK: dict[str, Any] = {
    "ssd_alphas": [1.0, 10.0],
    "ssd_lambdas": [1.0],
    "ssd_forget_sizes": [10, 0],
    "scrub_lrs": [1e-3],
    "scrub_max_epochs": [1],
    "scrub_epochs": [1, 2],
    "scrub_forget_sizes": [0],
}
#: The SAP paper's peer set sizes (retain, forget) on a 50,000-image training set, scaled by `oracle_sizes`.
PAPER_TRAIN_SIZE = 50_000
PAPER_SIZES = {"ssd": (5000, 1000), "scrub": (1000, 200)}


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """`--peer_<name>` arguments for every grid of `PEER_DEFAULTS` (None: the default, or QUICK's with --quick)."""
    for name, default in PEER_DEFAULTS.items():
        kind = type(default[0] if isinstance(default, list) else default)
        parser.add_argument(
            f"--peer_{name}",
            type=kind,
            nargs="+" if isinstance(default, list) else None,
            default=None,
            help=f"peers: {name} (default {default})",
        )


def peer_settings(args: Any) -> dict[str, Any]:
    """The grids of one run: `args.peer_<name>` where given, else QUICK's (with `args.quick`) or PEER_DEFAULTS."""
    quick = bool(getattr(args, "quick", False))
    out = {}
    for name, default in PEER_DEFAULTS.items():
        given = getattr(args, f"peer_{name}", None)
        out[name] = given if given is not None else copy.copy(QUICK.get(name, default) if quick else default)
    return out


class Cost:
    """Per-sample passes: `train` (forward+backward) and `forward`; `epochs(n)` = (train + forward / 3) / n."""

    def __init__(self) -> None:
        self.train = 0
        self.forward = 0

    def epochs(self, n_train: int) -> float:
        return (self.train + self.forward / 3) / n_train


def _params(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters()}


def diagonal_fisher(
    model: Any, x: Any, y: Any, prefixes: Sequence[int] = (), cost: Optional[Cost] = None
) -> dict[int, dict]:
    """Mean squared per-sample gradient of the cross-entropy of (x, y) for every parameter (eval mode).

    One forward+backward per sample, in order; `prefixes` (sizes k) also return the importance over the
    first k samples (one pass serves a top-k grid). Returns {k: {param name: tensor}}, len(x) always
    included. The model's weights are unchanged (its .grad is cleared).
    """
    import torch
    import torch.nn.functional as F

    params = _params(model)
    sizes = sorted({k for k in prefixes if 0 < k < len(x)} | {len(x)})
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    out: dict[int, dict] = {}
    model.eval()
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(pixel_values=x[i : i + 1]).logits, y[i : i + 1]).backward()
        for name, p in params.items():
            if p.grad is not None:
                total[name] += p.grad.detach() ** 2
        if i + 1 in sizes:
            out[i + 1] = {name: t / (i + 1) for name, t in total.items()}
    model.zero_grad(set_to_none=True)
    if cost is not None:
        cost.train += len(x)
    return out


def ssd_dampen(
    params: dict[str, Any], forget: dict[str, Any], retain: dict[str, Any], alpha: float, lam: float
) -> tuple[dict, int]:
    """SSD's update: theta_i * min(lam * I_r / I_f, 1) where I_f > alpha * I_r, theta_i elsewhere.

    `params`, `forget` (I_f), `retain` (I_r): {name: tensor} of the same shapes. Returns the new
    {name: tensor} (inputs untouched) and how many parameters were selected.
    """
    import torch

    new, selected = {}, 0
    for name, theta in params.items():
        i_f, i_r = forget[name], retain[name]
        mask = i_f > alpha * i_r
        beta = torch.where(
            mask, (lam * i_r / torch.where(mask, i_f, torch.ones_like(i_f))).clamp(max=1.0), torch.ones_like(i_f)
        )
        new[name] = theta.detach() * beta
        selected += int(mask.sum())
    return new, selected


def _load_params(model: Any, values: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, p in _params(model).items():
            p.copy_(values[name])


def kl_to_teacher(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """KL(teacher || student) of the temperature-T softmaxes, batch mean, times T^2."""
    import torch.nn.functional as F

    t = temperature
    return (
        F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1), reduction="batchmean")
        * t
        * t
    )


def scrub_train(
    model: Any,
    teacher: Any,
    forget: tuple[Any, Any],
    retain: tuple[Any, Any],
    *,
    lr: float,
    max_epochs: int,
    epochs: int,
    temperature: float,
    kl_weight: float,
    ce_weight: float,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[int], None],
    cost: Optional[Cost] = None,
) -> None:
    """SCRUB from the model's current weights: `epochs` epochs, max pass on `forget` while epoch <= `max_epochs`,
    then a min pass on `retain`; `on_epoch(epoch)` after each (the model is left at the last epoch's weights)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    teacher.eval()

    def run_pass(x: Any, y: Any, maximise: bool) -> None:
        def batch_loss(index: Any, epoch: int) -> Any:
            with torch.no_grad():
                target = teacher(pixel_values=x[index]).logits
            logits = model(pixel_values=x[index]).logits
            kl = kl_to_teacher(logits, target, temperature)
            return -kl if maximise else kl_weight * kl + ce_weight * F.cross_entropy(logits, y[index])

        common.train_epochs(model, len(x), batch_size, batch_loss, optimizer, generator=generator, epochs=[0])
        if cost is not None:
            cost.train += len(x)
            cost.forward += len(x)  # the teacher's outputs

    for epoch in range(1, epochs + 1):
        model.train()
        if epoch <= max_epochs and len(forget[0]):
            run_pass(*forget, maximise=True)
        run_pass(*retain, maximise=False)
        on_epoch(epoch)
    model.eval()


def _forget_sizes(sizes: Sequence[int], available: int) -> list[int]:
    """The grid's sizes that fit (0 = all), deduplicated, in increasing order; at least "all" when any sample exists."""
    resolved = {available if k == 0 else k for k in sizes if k <= available}
    return sorted(k for k in resolved | ({available} if available else set()) if k > 0)


def run_ssd(
    model: Any,
    data: dict,
    forget: tuple[Any, Any],
    retain: tuple[Any, Any],
    grid: dict,
    sizes: Sequence[int],
    validate: Callable[[Any], float],
    cost: Cost,
) -> dict[str, Any]:
    """SSD over the grid (forget top-k sizes x alpha x lambda), "no change" first; the model is left at the best."""
    original = {name: p.detach().clone() for name, p in _params(model).items()}
    best = {"val_accuracy": validate(model), "alpha": None, "lam": None, "forget_size": 0, "selected": 0}
    trials = []
    ks = _forget_sizes(sizes, len(forget[0]))
    if ks:
        retain_imp = diagonal_fisher(model, *retain, cost=cost)[len(retain[0])]
        forget_imps = diagonal_fisher(model, forget[0][: ks[-1]], forget[1][: ks[-1]], prefixes=ks, cost=cost)
        for k in ks:
            for alpha in grid["ssd_alphas"]:
                for lam in grid["ssd_lambdas"]:
                    new, selected = ssd_dampen(original, forget_imps[k], retain_imp, alpha, lam)
                    _load_params(model, new)
                    val = validate(model)
                    choice = {"forget_size": k, "alpha": alpha, "lam": lam, "selected": selected}
                    trials.append(dict(choice, val_accuracy=round(val, 4)))
                    if val > best["val_accuracy"]:
                        best = dict(choice, val_accuracy=val, state={n: t.clone() for n, t in new.items()})
    _load_params(model, best.pop("state", original))
    k = best["forget_size"]
    best.update(
        trials=trials, retain_size=len(retain[0]) if k else 0, final_train_passes=(len(retain[0]) + k) if k else 0
    )
    return best


def run_scrub(
    model: Any,
    data: dict,
    forget: tuple[Any, Any],
    retain: tuple[Any, Any],
    grid: dict,
    sizes: Sequence[int],
    validate: Callable[[Any], float],
    cost: Cost,
    seed: int,
) -> dict[str, Any]:
    """SCRUB over the grid (forget top-k x lr x max_epochs, val at `scrub_epochs`), "no change" first; model left at the best."""
    original = copy.deepcopy(model.state_dict())
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    best: dict[str, Any] = {
        "val_accuracy": validate(model),
        "lr": None,
        "max_epochs": 0,
        "scrub_epochs": 0,
        "forget_size": 0,
    }
    trials: list[dict] = []
    checkpoints = set(grid["scrub_epochs"])
    for k in _forget_sizes(sizes, len(forget[0])):
        for lr in grid["scrub_lrs"]:
            for max_epochs in grid["scrub_max_epochs"]:
                model.load_state_dict(original)

                def on_epoch(epoch: int) -> None:
                    nonlocal best
                    if epoch not in checkpoints:
                        return
                    val = validate(model)
                    choice = {"forget_size": k, "lr": lr, "max_epochs": max_epochs, "scrub_epochs": epoch}
                    trials.append(dict(choice, val_accuracy=round(val, 4)))
                    if val > best["val_accuracy"]:
                        best = dict(choice, val_accuracy=val, state=copy.deepcopy(model.state_dict()))

                scrub_train(
                    model,
                    teacher,
                    (forget[0][:k], forget[1][:k]),
                    retain,
                    lr=lr,
                    max_epochs=max_epochs,
                    epochs=max(checkpoints),
                    temperature=grid["scrub_temperature"],
                    kl_weight=grid["scrub_kl_weight"],
                    ce_weight=grid["scrub_ce_weight"],
                    batch_size=grid["scrub_batch_size"],
                    seed=seed,
                    on_epoch=on_epoch,
                    cost=cost,
                )
    model.load_state_dict(best.pop("state", original))
    k, epochs = best["forget_size"], best["scrub_epochs"]
    passes = k * min(best["max_epochs"], epochs) + len(retain[0]) * epochs
    best.update(
        trials=trials,
        retain_size=len(retain[0]) if epochs else 0,
        final_train_passes=passes,
        final_forward_passes=passes,
        temperature=grid["scrub_temperature"],
        kl_weight=grid["scrub_kl_weight"],
        ce_weight=grid["scrub_ce_weight"],
    )
    return best


def oracle_sizes(n_train: int) -> dict[str, tuple[int, int]]:
    """The SAP paper's (retain, forget) sizes per method scaled from 50,000 training images to `n_train` (>= 1 each)."""
    return {m: tuple(max(1, round(s * n_train / PAPER_TRAIN_SIZE)) for s in sizes) for m, sizes in PAPER_SIZES.items()}


def oracle_sets(data: dict, retain_size: int, forget_size: int, seed: int) -> tuple[Any, Any]:
    """Random positions of truly mislabelled (forget) and correctly labelled (retain) training images (hidden labels)."""
    import torch

    generator = torch.Generator().manual_seed(10_007 + seed)
    noisy = torch.nonzero(data["is_noisy"]).flatten()
    clean = torch.nonzero(~data["is_noisy"]).flatten()
    forget = noisy[torch.randperm(len(noisy), generator=generator)[:forget_size]]
    retain = clean[torch.randperm(len(clean), generator=generator)[:retain_size]]
    return forget, retain


def peer_rows(
    model: Any,
    data: dict,
    *,
    trusted_indices: Sequence[int],
    suspects: Sequence[int],
    args: Any,
    seed: int,
    methods: Sequence[str] = ("ssd", "scrub"),
    forget_sets: Sequence[str] = ("realistic", "oracle"),
) -> list[dict]:
    """SSD and SCRUB with the realistic and the oracle forget sets: four rows (see the module docstring), or those
    of `methods` x `forget_sets`.

    `model`: the uncorrected ViTForImageClassification at its final state (restored before returning);
    `data`: `common.load_run_data`'s dict; `trusted_indices`: the recipe's trusted samples (positions in
    train); `suspects`: the label audit's suspects, most suspicious first; `args`: a namespace with
    optional `peer_<grid>` / `quick` attributes (`peer_settings`). Rows: method, forget_set, oracle,
    test/val accuracy, `val_unchanged`, the chosen hyper-parameters (SSD: alpha, lam; SCRUB: lr, max_epochs,
    scrub_epochs: names no caller's row uses), forget/retain sizes, the forget set's
    share of truly mislabelled images (`forget_noisy_fraction`, reported only), cost_epochs,
    cost_epochs_final, fit diagnostics and the val grid (`trials`).
    """
    import torch

    grid = peer_settings(args)
    original = copy.deepcopy(model.state_dict())
    n_train = len(data["train_x"])
    val_unchanged = common.accuracy(model, data["val_x"], data["val_y"])
    take = lambda index: (data["train_x"][index], data["train_y"][index])
    trusted = torch.as_tensor(list(trusted_indices), dtype=torch.long)
    suspected = torch.as_tensor(list(suspects), dtype=torch.long)
    sizes = oracle_sizes(n_train)
    rows = []
    for method in methods:
        oracle_forget, oracle_retain = oracle_sets(data, *sizes[method], seed)
        for forget_set, forget, retain in (
            ("realistic", suspected, trusted),
            ("oracle", oracle_forget, oracle_retain),
        ):
            if forget_set not in forget_sets:
                continue
            model.load_state_dict(original)
            cost, clock = Cost(), time.perf_counter()

            def validate(m: Any) -> float:
                cost.forward += len(data["val_x"])
                return common.accuracy(m, data["val_x"], data["val_y"])

            if method == "ssd":
                sizes_grid = grid["ssd_forget_sizes"] if forget_set == "realistic" else [0]
                best = run_ssd(model, data, take(forget), take(retain), grid, sizes_grid, validate, cost)
                final = best["final_train_passes"] / n_train
            else:
                sizes_grid = grid["scrub_forget_sizes"] if forget_set == "realistic" else [0]
                best = run_scrub(model, data, take(forget), take(retain), grid, sizes_grid, validate, cost, seed)
                final = (best["final_train_passes"] + best["final_forward_passes"] / 3) / n_train
            k = best.pop("forget_size")
            chosen = forget[:k]
            row = dict(
                method=method,
                forget_set=forget_set,
                oracle=forget_set == "oracle",
                test_accuracy=common.accuracy(model, data["test_x"], data["test_y"]),
                val_accuracy=best.pop("val_accuracy"),
                val_unchanged=val_unchanged,
                forget_size=k,
                forget_available=len(forget),
                forget_noisy_fraction=(float(data["is_noisy"][chosen].float().mean()) if k else None),
                cost_epochs=cost.epochs(n_train),
                cost_epochs_final=final,
                seconds=time.perf_counter() - clock,
                unchanged=k == 0 or best.get("scrub_epochs") == 0,
                **{key: v for key, v in best.items() if not key.startswith("final_")},
                **common.fit_diagnostics(model, data),
            )
            rows.append(row)
    model.load_state_dict(original)
    return rows
