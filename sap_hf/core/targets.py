"""Which `nn.Linear` layers SAP projects, and which of them share one input.

Names differ between `transformers` versions and model families (`attention.q_proj` vs
`attention.attention.query`, `self_attn.out_proj`, Swin's `blocks`, ...), so nothing here
lists one version's names. The structure is what is stable:

* the classification head is a Linear outside every `nn.ModuleList` whose `out_features`
  equals `config.num_labels`;
* the backbone is every other Linear (attention q/k/v/output and MLP layers live in the
  repeated blocks of an `nn.ModuleList`);
* layers that read the *same tensor* (q/k/v) share one activation statistic. That is decided
  by watching one real forward pass (the first batch of `stats.collect_statistics`), not by names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn
from transformers.utils import logging

from .adapters import check_no_adapters


logger = logging.get_logger(__name__)

Patterns = Optional[Union[str, Sequence[str]]]

LAYER_KINDS: tuple[str, ...] = ("attention", "mlp", "classifier")
_HEAD_NAMES = ("classifier", "head", "fc", "score", "logits")
"""Usual names of a classification head, to tell a head of the wrong width from a model without one."""
_ATTENTION_SEGMENT = re.compile(r".*(attn|attention).*", re.IGNORECASE)


@dataclass(frozen=True)
class TargetGroup:
    """Linear layers that read one input tensor, hence one Gram matrix `X^T X`.

    `name` (the first member) keys the statistic; `members` are all layers projected with it.
    """

    name: str
    members: tuple[str, ...]
    in_features: int


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def classifier_names(model: nn.Module) -> list[str]:
    """Linear layers that produce the logits: outside every ModuleList, `out_features == num_labels`."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is None:
        return []
    in_blocks = _names_inside_module_lists(model)
    return [
        name
        for name, module in linear_layers(model).items()
        if module.out_features == num_labels and name not in in_blocks
    ]


def matches(name: str, patterns: Patterns) -> bool:
    """PEFT semantics: a str is a regex that must match the whole name; a list holds name suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in patterns)


def find_target_modules(
    model: nn.Module,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    project_classifier: bool = True,
) -> list[str]:
    """Names of the Linear layers to project, in module order.

    `target_modules` picks backbone layers (None or 'all-linear': all of them), `project_classifier`
    adds the head. Raises a ValueError listing the model's Linear layers when the selection leaves
    the backbone empty, even if the head is still projected: a typo in a pattern must not silently
    shrink SAP to the classifier. The one way to project the head alone is `target_modules=[]`
    with `project_classifier=True` (logged). A model that still holds PEFT adapter modules raises:
    `lora_A`/`lora_B`/`base_layer` are not layers of the model SAP corrects (merge them first).
    """
    check_no_adapters(model)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex ({err}).") from None
    layers = linear_layers(model)
    heads = set(classifier_names(model))
    head_only = isinstance(target_modules, (list, tuple)) and len(target_modules) == 0
    selected, backbone = [], []
    for name in layers:
        if name in heads:
            chosen = project_classifier
        elif target_modules is None or target_modules == "all-linear":
            chosen = True
        else:
            chosen = matches(name, target_modules)
        if chosen and not matches(name, exclude_modules):
            selected.append(name)
            if name not in heads:
                backbone.append(name)
    has_backbone = any(name not in heads for name in layers)
    if heads and not has_backbone and not head_only and project_classifier:
        raise ValueError(
            f"The model ({type(model).__name__}) has no nn.Linear layer besides its classification head "
            f"{sorted(heads)} (a convolutional backbone?): SAP projects nn.Linear layers, so with "
            f"target_modules={target_modules!r} it would correct the head alone. To do that knowingly, pass "
            "target_modules=[] with project_classifier=True; to correct the backbone, use a transformer (ViT-family) "
            "model."
        )
    if not selected or (has_backbone and not backbone and not head_only):
        listing = ", ".join(layers) if layers else "(the model has no nn.Linear layer)"
        head_note = f" (only the classifier {sorted(heads)} would be projected)" if selected else ""
        raise ValueError(
            f"No backbone nn.Linear layer matches target_modules={target_modules!r}{head_note} "
            f"(exclude_modules={exclude_modules!r}, project_classifier={project_classifier}). "
            f"The model's Linear layers are: {listing}. Use a regex that fully matches some of these "
            "names, a list of their suffixes (e.g. ['q_proj', 'fc1']), or 'all-linear'; to project the "
            "classification head alone, pass target_modules=[] with project_classifier=True."
        )
    if head_only:
        logger.warning(
            "target_modules=[] with project_classifier=True: SAP projects the classification head alone (%s); "
            "the backbone is left unchanged.",
            ", ".join(selected),
        )
    return selected


def layer_kind(name: str, heads: Sequence[str]) -> str:
    """'classifier' (a head), 'attention' (a dotted name segment holds 'attn'/'attention': q/k/v and the
    attention output of ViT, DeiT, BEiT, DINOv2, Swin, CLIP) or 'mlp' (every other backbone Linear)."""
    if name in heads:
        return "classifier"
    return "attention" if any(_ATTENTION_SEGMENT.fullmatch(part) for part in name.split(".")) else "mlp"


def group_kinds(groups: Sequence[TargetGroup], heads: Sequence[str]) -> dict[str, str]:
    """The layer kind of every group (q/k/v share one input, hence one kind), keyed by group name."""
    return {group.name: layer_kind(group.members[0], heads) for group in groups}


def check_layer_kinds(kind_alphas: Mapping[str, object], argument: str = "alpha") -> None:
    """Raise for a key that is not one of `LAYER_KINDS` (a typo would otherwise leave layers unchanged)."""
    unknown = sorted(set(kind_alphas) - set(LAYER_KINDS))
    if unknown:
        raise ValueError(
            f"{argument}={dict(kind_alphas)!r} has unknown layer kind(s) {unknown}: use keys from {list(LAYER_KINDS)}, "
            "e.g. {'attention': 100.0, 'mlp': 1000.0}."
        )


def group_alphas(
    groups: Sequence[TargetGroup], kinds: Mapping[str, str], kind_alphas: Mapping[str, Optional[float]]
) -> dict[str, Optional[float]]:
    """Per-group alpha from per-kind alphas; a kind that is absent or None leaves its groups unchanged."""
    check_layer_kinds(kind_alphas)
    return {group.name: kind_alphas.get(kinds[group.name]) for group in groups}


def group_by_identity(names: Sequence[str], inputs: Sequence[object], in_features: Sequence[int]) -> list[TargetGroup]:
    """Group layers whose recorded input is the very same tensor object (pure helper)."""
    groups: list[tuple[object, list[str], int]] = []
    for name, tensor, width in zip(names, inputs, in_features):
        for held, members, _ in groups:
            if held is tensor:
                members.append(name)
                break
        else:
            groups.append((tensor, [name], width))
    return [TargetGroup(name=members[0], members=tuple(members), in_features=width) for _, members, width in groups]


def _names_inside_module_lists(model: nn.Module) -> set[str]:
    inside: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for sub_name, _ in module.named_modules():
                if sub_name:
                    inside.add(f"{prefix}.{sub_name}" if prefix else sub_name)
    return inside


# ----------------------------------------------------------------------------------------------
# The model side of the input contract
# ----------------------------------------------------------------------------------------------


def check_classifier(
    model: nn.Module, num_labels: Optional[int] = None, argument: str = "model", takes_num_labels: bool = False
) -> int:
    """The number of classes of a single-label image classifier with real weights; a ValueError otherwise.

    `takes_num_labels`: the caller has a `num_labels=` argument, which the error for a model without
    `config.num_labels` may then advise (others must not advise an argument they do not take).

    SAP's trusted selection, evaluation and audit read one class id per sample and argmax logits:
    a regression or multi-label head would be "corrected" against meaningless losses, so they are
    refused here, before any data is read or weight changed.
    """
    if any(parameter.is_meta for parameter in model.parameters()):
        raise ValueError(
            f"{argument} has parameters on the meta device (no weights loaded): load it with its weights, e.g. "
            "from_pretrained(...) without device_map='meta' / init_empty_weights()."
        )
    config = getattr(model, "config", None)
    problem = getattr(config, "problem_type", None)
    if problem in ("regression", "multi_label_classification"):
        raise ValueError(
            f"{argument} is a {problem} model (config.problem_type={problem!r}); SAP corrects single-label classifiers "
            "(problem_type None or 'single_label_classification')."
        )
    num_labels = num_labels or getattr(config, "num_labels", None)
    if num_labels is None:
        advice = "Pass num_labels= or use" if takes_num_labels else "Use"
        raise ValueError(
            f"The number of classes of {argument} ({type(model).__name__}) is unknown: it has no config.num_labels. "
            f"{advice} a transformers image classifier, whose config gives "
            "num_labels (e.g. AutoModelForImageClassification.from_pretrained(...))."
        )
    if int(num_labels) < 2:
        raise ValueError(
            f"{argument} has num_labels={num_labels}: a one-output head is a regression model; SAP corrects single-label "
            "classifiers with at least 2 classes."
        )
    if config is not None and not classifier_names(model):
        in_blocks = _names_inside_module_lists(model)
        outside = [(name, layer) for name, layer in linear_layers(model).items() if name not in in_blocks]
        classifies = "Classification" in type(model).__name__  # a headless backbone (ViTModel's pooler) is not one
        outside = [(n, layer) for n, layer in outside if classifies or n.rsplit(".", 1)[-1] in _HEAD_NAMES]
        if outside:
            name, layer = outside[-1]
            raise ValueError(
                f"{argument} ({type(model).__name__}) has num_labels={num_labels} (config.id2label names "
                f"{len(getattr(config, 'id2label', None) or {})} classes) but its last layer outside the blocks, "
                f"{name!r}, has {layer.out_features} outputs: the config and the head disagree. Load the model with "
                f"the head's classes (from_pretrained(..., num_labels={layer.out_features}) or a config whose "
                f"id2label has {layer.out_features} names), or give it a {num_labels}-class head and train it first."
            )
        raise ValueError(
            f"{argument} ({type(model).__name__}) has no classification head (no nn.Linear with num_labels={num_labels} "
            "outputs): SAP corrects image classifiers, e.g. AutoModelForImageClassification.from_pretrained(...)."
        )
    return int(num_labels)
