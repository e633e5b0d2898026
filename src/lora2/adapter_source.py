"""A LoRA² adapter as plain data, from a live ``LoRA2Model`` or a saved directory (no base weights needed).

Export and the benchmarks read adapters through this: per adapted matrix one ``LoRA2Factors``
(factors, mask, scaling, layout), plus the config, the modules_to_save tensors and what the
metadata says about the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, LoRA2Config
from .factors import FACTOR_NAMES, LoRA2Factors
from .persistence import WEIGHTS_NAME, read_adapter_meta, read_adapter_tensors
from .targets import shared_paths, tied_adapted, tied_outside


@dataclass
class LoRA2Source:
    config: LoRA2Config
    factors: dict[str, LoRA2Factors]
    modules_to_save: list[str]
    saved_tensors: dict[str, torch.Tensor]  # modules_to_save weights, keyed by name in the unwrapped model
    base_model_name_or_path: str | None
    base_model_class: str | None
    where: str
    shared_paths: dict[str, list[str]] = field(default_factory=dict)  # layers registered under several parents
    tied: dict[str, str] = field(default_factory=dict)  # adapted layers whose base weight another module shares

    @property
    def fan_in_fan_out(self) -> dict[str, bool]:
        return {name: f.fan_in_fan_out for name, f in self.factors.items()}

    def check(self) -> None:
        """Every matrix's tensors have the config's k/r shapes and are finite (raises ``ValueError``)."""
        for name, f in self.factors.items():
            f.check(self.config.k, self.config.r, name, self.where)

    def refuse_shared_paths(self) -> None:
        """PEFT adapts a module at the first path it finds only; LoRA² adapts a layer registered under two parents
        at each, so a PEFT adapter of it would not reproduce the model."""
        for name, paths in self.shared_paths.items():
            raise ValueError(
                f"{name} in {self.where} is one layer registered at {len(paths)} paths ({', '.join(paths[:3])}): PEFT "
                "would adapt it at one path only, so the exported adapter would not reproduce this model. Serve the "
                "merged model (merge_and_unload()) instead.")


def check_untied_modules_to_save(pairs: list[tuple[str, str]] | list[list[str]]) -> None:
    """A PEFT adapter stores a modules_to_save module as its own copy, so a weight it shares with a module outside
    them (a head tied to the embeddings) would come back untied and the exported model would differ."""
    if pairs:
        inside, outside = pairs[0]
        raise ValueError(
            f"{inside} (modules_to_save) is tied to {outside}: a PEFT adapter would load it as an untied copy and "
            f"the exported model would differ. Add {outside.rsplit('.', 1)[0]!r} to modules_to_save as well, so the "
            "shared tensor is saved for both modules."
        )


def peft_suffix_caught(base: Any, modules_to_save: list[str], adapted: list[str]) -> list[str]:
    """Modules PEFT would also treat as modules_to_save because it matches those names as plain suffixes
    (DistilBERT's 'pre_classifier' for 'classifier'); a PEFT load then expects their weights in the file."""
    def outside(name: str) -> bool:
        return not any(name == s or name.startswith(s + ".") or s.startswith(name + ".") for s in modules_to_save)

    caught = [n for n, m in base.named_modules(remove_duplicate=False) if n and outside(n) and n not in adapted
              and any(n.endswith(s) for s in modules_to_save) and any(True for _ in m.parameters())]
    for name in caught:
        inner = [a for a in adapted if a.startswith(name + ".")]
        if inner:
            raise ValueError(
                f"PEFT would treat {name!r} as modules_to_save (it matches names as plain suffixes, and {name!r} ends "
                f"with a modules_to_save entry), but it holds the adapted {inner[0]!r}, which PEFT cannot load inside "
                "a module it saves in full. Rename the module, or leave its layers out of target_modules, to export "
                "this model to PEFT.")
    return caught


def source_from_model(model: Any) -> LoRA2Source:
    """The adapter of a live ``LoRA2Model``, copied to the CPU."""
    if getattr(model, "_unloaded", False):
        raise ValueError("This LoRA2Model was unloaded by merge_and_unload(); export the model before merging, "
                         "or export its saved adapter directory.")
    model.check_config_matches_layers()
    check_untied_modules_to_save(tied_outside(model.base_model, list(model.modules_to_save_names)))
    saved: dict[str, torch.Tensor] = {}
    with model._modules_to_save_as_trained():  # inside disable_adapter() too: the trained values
        for name in model.modules_to_save_names:
            for key, value in model.base_model.get_submodule(name).state_dict().items():
                saved[f"{name}.{key}"] = value.detach().cpu()
        for name in peft_suffix_caught(model.base_model, list(model.modules_to_save_names), list(model.lora2_layers)):
            for key, value in model.base_model.get_submodule(name).state_dict().items():
                saved[f"{name}.{key}"] = value.detach().cpu()  # as they are (frozen): PEFT expects them
    return LoRA2Source(
        config=model.lora2_config,
        factors={name: layer.factors().to("cpu") for name, layer in model.lora2_layers.items()},
        modules_to_save=list(model.modules_to_save_names),
        saved_tensors=saved,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        base_model_class=type(model.base_model).__name__,
        where="the LoRA2Model",
        shared_paths=shared_paths(model.base_model, model.lora2_layers),
        tied=tied_adapted(model.base_model, model.lora2_layers),
    )


def read_lora2_adapter(directory: str | Path) -> LoRA2Source:
    """A saved LoRA² adapter directory, validated: config, one ``LoRA2Factors`` per matrix, and the rest."""
    directory = Path(directory)
    meta, config = read_adapter_meta(directory)
    names = meta.get("adapted_modules")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{directory / CONFIG_NAME} has no usable 'adapted_modules' list; the file is corrupted. "
                         "Re-save the adapter with LoRA2Model.save_pretrained.")
    fan = meta.get("fan_in_fan_out")
    if not isinstance(fan, dict) or set(fan) != set(names):
        raise ValueError(
            f"{directory / CONFIG_NAME} does not say which adapted layers are GPT-2 Conv1D ('fan_in_fan_out', written "
            "by lora2 since the export feature). Load it with LoRA2Model.from_pretrained(base_model, dir) and pass "
            "that model to export_to_peft, or re-save it with save_pretrained."
        )
    to_save = meta.get("modules_to_save") or []
    check_untied_modules_to_save(meta.get("modules_to_save_tied_outside") or [])
    tensors = read_adapter_tensors(directory, meta)
    factors: dict[str, LoRA2Factors] = {}
    for name in names:
        missing = [p for p in FACTOR_NAMES if f"{name}.{p}" not in tensors]
        if missing:
            raise ValueError(f"{directory / WEIGHTS_NAME} lacks {[f'{name}.{p}' for p in missing]}; the adapter is "
                             "incomplete or corrupted. Re-save it with LoRA2Model.save_pretrained.")
        own = {p: tensors.pop(f"{name}.{p}") for p in FACTOR_NAMES}
        factors[name] = LoRA2Factors.from_tensors(own, config.scaling, bool(fan[name]))
    stray = [key for key in tensors if not any(key.startswith(m + ".") for m in to_save)]
    if stray:
        raise ValueError(f"{directory / WEIGHTS_NAME} has tensors that belong to no adapted module or modules_to_save, "
                         f"e.g. {stray[:3]}; the weights do not match {CONFIG_NAME}.")
    return LoRA2Source(
        config=config,
        factors=factors,
        modules_to_save=list(to_save),
        saved_tensors=tensors,
        base_model_name_or_path=meta.get("base_model_name_or_path"),
        base_model_class=meta.get("base_model_class"),
        where=f"the adapter in {directory}",
        shared_paths=dict(meta.get("shared_paths") or {}),
        tied=dict(meta.get("tied_adapted") or {}),
    )
