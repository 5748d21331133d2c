"""PEFT (LoRA) models: SAP corrects the merged weights, never the adapter matrices.

A LoRA layer computes `(W + s·B·A) x`, and the same input x feeds `W` and `A`. SAP's correction
of that effective weight is `(W + s·B·A)·P = W·P + s·B·(A·P)`: merging the adapters first
(`merge_and_unload()`) and projecting the plain Linear gives exactly that. Projecting `lora_A`,
`lora_B` or `base_layer` as if they were model layers does not: their inputs are not the layer's
input (B reads A's output) and a projected `base_layer` alone misses `s·B·A`. A `modules_to_save`
head holds two copies (`original_module`, unused, and `modules_to_save.<adapter>`, the trained
one); merging makes the trained copy the head.

Merging also matters for saving: a `PeftModel` saves only its adapters, so a correction written
into `W` would be lost. The merged model is a plain `transformers` model and saves whole.

`peft` is an optional extra: it is imported only when a model may be a PEFT model (it is then
already imported, since that model was built with it). Detection also works by structure (a
transformers model with adapters injected by `model.add_adapter(...)`).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Dotted-name segments that only adapter modules have (LoRA matrices, the wrapped layer, the
# modules_to_save copies). `base_layer` is shared by every peft tuner layer (LoRA, DoRA, IA3, LoHa, ...).
ADAPTER_SEGMENTS: tuple[str, ...] = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "base_layer",
    "modules_to_save",
    "original_module",
)

_FIX = (
    "pass the PEFT model to sap_correct / sap_project / SAPTrainer.correct, which merge the adapters "
    "(W + s·B·A) first and return the merged model (sap_project's return value, result.model), or call "
    "model = model.merge_and_unload() yourself first"
)


def _peft_wrapper_classes() -> tuple[type, ...]:
    """`PeftModel`/`PeftMixedModel` when peft is imported (a model built with peft implies it is)."""
    if "peft" not in sys.modules:
        return ()
    try:
        import peft
    except Exception:  # a broken install: structure-based detection still applies
        return ()
    return tuple(cls for cls in (getattr(peft, "PeftModel", None), getattr(peft, "PeftMixedModel", None)) if cls)


def adapter_module_names(model: nn.Module) -> list[str]:
    """Names of the model's modules that belong to adapters (see `ADAPTER_SEGMENTS`), in module order."""
    segments = set(ADAPTER_SEGMENTS)
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if segments.intersection(parts) or (hasattr(module, "base_layer") and hasattr(module, "lora_A")):
            found.append(name)
    return found


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model: a `PeftModel` (or mixed), or any model that holds adapter modules."""
    return isinstance(model, _peft_wrapper_classes()) or bool(adapter_module_names(model))


def describe(model: nn.Module) -> str:
    """'PeftModel (LORA) wrapping ViTForImageClassification': what error messages name."""
    name = type(model).__name__
    inner = _inner_model(model)
    peft_type = _peft_type(model)
    detail = f" ({peft_type})" if peft_type else ""
    return f"{name}{detail} wrapping {type(inner).__name__}" if inner is not model else f"{name}{detail}"


def check_no_adapters(model: nn.Module, argument: str = "model") -> None:
    """Raise a ValueError when `model` still holds adapter modules (SAP must not target them)."""
    if not is_peft_model(model):
        return
    names = adapter_module_names(model)
    adapter_set = set(names)  # show the Linear ones first: those a name-based selection would have targeted
    names = [n for n, m in model.named_modules() if n in adapter_set and isinstance(m, nn.Linear)] or names
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    modules = f"; its adapter modules include {shown}" if names else ""
    raise ValueError(
        f"{argument} is a PEFT model ({describe(model)}{modules}). SAP corrects the effective weights "
        f"W + s·B·A, not the adapter matrices: {_FIX}."
    )


def merge_adapters(model: nn.Module) -> nn.Module:
    """The plain model with every active adapter merged in; a model without adapters is returned as is.

    A `PeftModel` is merged with `merge_and_unload()` (W_eff = W + s·B·A; the `modules_to_save` copy
    of the head becomes the head) and the returned base model is what SAP corrects and what must
    be saved. The wrapper is consumed: its inner model is the returned one. A transformers model
    with injected adapters (`model.add_adapter(...)`) is merged in place and returned.
    Merging does not change what the model computes. Raises a ValueError, before any weight
    changes, for what cannot be merged (prompt learning, tuner layers without merge support,
    disabled adapters, a configuration peft's own pre-merge check refuses); a failure inside peft's
    merge itself (e.g. several active adapters it cannot combine) is re-raised as a ValueError too.
    """
    is_wrapper = isinstance(model, _peft_wrapper_classes())
    tuner_layers = [(n, m) for n, m in model.named_modules() if _is_tuner_layer(m)]
    if not is_wrapper and not tuner_layers and not adapter_module_names(model):
        return model
    _check_mergeable(model, tuner_layers)
    active, inactive = _adapter_names(model)
    what, head_note = describe(model), ", modules_to_save copy as the head" if _has_modules_to_save(model) else ""
    try:
        if hasattr(type(model), "merge_and_unload") or is_wrapper:
            merged = model.merge_and_unload(safe_merge=True)
        else:
            merged = _merge_in_place(model)
    except Exception as err:  # NotImplementedError, ValueError (peft's own checks), AttributeError, ...
        several = (
            f" It has several active adapters {active}: activate one (model.set_adapter(name)) or combine them "
            "(add_weighted_adapter) first."
            if len(active) > 1
            else ""
        )
        raise ValueError(
            f"model is a PEFT model ({what}) whose adapters cannot be merged "
            f"({type(err).__name__}: {err}).{several} SAP needs the merged weights W + s·B·A: merge the "
            "adapters yourself (model.merge_and_unload()), or correct a model fine-tuned without adapters."
        ) from err
    left = adapter_module_names(merged)
    if left:
        raise ValueError(
            f"Merging the adapters of {what} left adapter modules {left[:3]}: SAP cannot correct this model. "
            "Merge it yourself (model.merge_and_unload()) and check that the result is a plain model."
        )
    if getattr(merged, "_hf_peft_config_loaded", False):  # else save_pretrained would write only (absent) adapters
        merged._hf_peft_config_loaded = False
    if "peft_config" in getattr(merged, "__dict__", {}):
        del merged.peft_config
    for parameter in merged.parameters():  # PEFT froze the base weights; a plain model trains whole (refine, Trainer)
        parameter.requires_grad_(True)
    dropped = f"; inactive adapter(s) {inactive} were dropped (they did not affect the outputs)" if inactive else ""
    logger.warning(
        "SAP: merged the PEFT adapter(s) %s of %s into the weights (W + s·B·A%s)%s. The plain %s returned "
        "(sap_project's return value, SAPResult.model, SAPTrainer.model) is the corrected model: save it whole "
        "(save_pretrained), since saving the PEFT wrapper would write only adapters and lose the correction.",
        active or "(default)",
        what,
        head_note,
        dropped,
        type(merged).__name__,
    )
    return merged


def merge_for_correction(model: nn.Module, base: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(model, base) for the rest of a correction: unchanged for a plain model, (merged, merged) for a PEFT one.

    `model` is what the caller gave (maybe behind an Accelerate/DDP wrapper), `base` the unwrapped
    model. The corrected model handed back must be the merged one, not the wrapper of the consumed PEFT model.
    """
    merged = merge_adapters(base)
    return (model, base) if merged is base else (merged, merged)


def _is_tuner_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "merge")


def _check_mergeable(model: nn.Module, tuner_layers: list[tuple[str, nn.Module]]) -> None:
    """Everything that would make the merge fail or change the model's outputs, checked before any write."""
    config = _active_config(model)
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"model is a PEFT model ({describe(model)}) with prompt learning: its virtual tokens are not weights "
            "that can be merged, so SAP has no plain model to correct. Correct a model fine-tuned with LoRA "
            "(or without adapters) instead."
        )
    base_merge = _base_tuner_merge()
    for name, layer in tuner_layers:
        if base_merge is not None and getattr(type(layer), "merge", None) is base_merge:
            raise ValueError(
                f"model is a PEFT model ({describe(model)}) whose adapter layer {name!r} ({type(layer).__name__}) "
                "has no merge support, so SAP cannot correct its effective weights. Use an adapter type that "
                "merges (e.g. LoRA) or correct a model fine-tuned without adapters."
            )
        if getattr(layer, "disable_adapters", False) is True:
            raise ValueError(
                f"model is a PEFT model ({describe(model)}) whose adapters are disabled (layer {name!r}): merging "
                "them would change its outputs. Enable them (model.enable_adapters(), or leave the "
                "disable_adapter() context) or remove them (model.unload()) before SAP."
            )


def _merge_in_place(model: nn.Module) -> nn.Module:
    """Merge and unload adapters injected into a plain model (no tuner wrapper to call merge_and_unload on)."""
    tuner_names = [name for name, module in model.named_modules() if _is_tuner_layer(module)]
    keys = [
        name
        for name, _ in model.named_modules()
        if name and not any(name.startswith(prefix + ".") for prefix in tuner_names)
    ]
    for key in keys:
        parent_name, _, child_name = key.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            target = getattr(parent, child_name)
        except AttributeError:  # under a module already replaced
            continue
        if hasattr(target, "unload_and_optionally_merge_module"):  # modules_to_save / trainable tokens
            setattr(
                parent,
                child_name,
                target.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None),
            )
        elif _is_tuner_layer(target):
            target.merge(safe_merge=True)
            setattr(parent, child_name, target.get_base_layer())
        elif isinstance(getattr(target, "modules_to_save", None), nn.ModuleDict) and hasattr(
            target, "original_module"
        ):
            # peft < 0.15 ModulesToSaveWrapper: the active adapter's trained copy is what forward uses
            active = getattr(target, "active_adapter", None)
            copies = target.modules_to_save
            setattr(
                parent,
                child_name,
                copies[active] if isinstance(active, str) and active in copies else target.original_module,
            )
    return model


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (PeftModel.base_model.model), else the model itself."""
    if not isinstance(model, _peft_wrapper_classes()):
        return model
    tuner = getattr(model, "base_model", model)
    return getattr(tuner, "model", tuner)


def _active_config(model: nn.Module) -> Optional[Any]:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active, _ = _adapter_names(model)
    return configs.get(active[0]) if active and active[0] in configs else next(iter(configs.values()))


def _peft_type(model: nn.Module) -> str:
    config = _active_config(model)
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type)) if peft_type is not None else ""


def _adapter_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(active, inactive) adapter names as far as the model says (both empty when it does not)."""
    configs = getattr(model, "peft_config", None)
    known = list(configs) if isinstance(configs, dict) else []
    try:
        active = getattr(model, "active_adapters", None)
        active = active() if callable(active) else active
    except Exception:  # transformers raises when no adapter is loaded
        active = None
    if isinstance(active, str):
        active = [active]
    active = [str(a) for a in active] if active else known[:1]
    return active, [name for name in known if name not in active]


def _has_modules_to_save(model: nn.Module) -> bool:
    return any(name.split(".")[-1] == "modules_to_save" for name, _ in model.named_modules())


def _base_tuner_merge() -> Optional[Any]:
    """`BaseTunerLayer.merge` (which only raises NotImplementedError), to spot tuner layers that cannot merge."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:
        return None
    return BaseTunerLayer.merge
