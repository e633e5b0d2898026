"""PEFT LoRA → LoRA²: start a fresh ``LoRA2Model`` whose update equals a PEFT LoRA adapter's, exactly.

The other direction of ``export.export_to_peft``; what a rank-m PEFT matrix becomes is in the
docstring of ``init_from_peft_lora``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from .persistence import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME, read_json, read_tensors
from .targets import tied_parameters


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches ``name`` as a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def init_from_peft_lora(model: Any, peft_adapter_dir: str | Path) -> list[str]:
    """Set a fresh ``LoRA2Model``'s factors so that its update equals a PEFT LoRA adapter's, exactly.

    For a PEFT matrix ``scaling · B A`` of rank m (needs m ≤ k and m ≤ r): ``p_outer[:, :m] = Aᵀ``,
    ``q_outer[:m] = scaling · Bᵀ``, ``q_outer[m:] = 0``; the first m singular values get
    ``p_inner[:, i] = e_i``, ``q_inner[i] = e_iᵀ``, ``lam_i = 1/s`` (so core = I on the first m),
    the other r − m keep their random ``p_inner``/``q_inner`` with ``lam = 0`` and can still learn.
    modules_to_save tensors (e.g. a classifier) are copied too. Matrices the PEFT adapter does not
    cover are left as they are (Δ = 0 on a fresh model). Returns the names initialised.
    """
    directory = Path(peft_adapter_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {directory} does not exist.")
    cfg = read_json(directory / PEFT_CONFIG_NAME)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{directory / PEFT_CONFIG_NAME} is not a PEFT LoRA config (peft_type must be 'LORA').")
    unsupported = [k for k in ("use_dora", "lora_bias") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and (init.startswith(("pissa", "corda")) or init in ("olora", "loftq", "lora_ga")):
        unsupported.append(f"init_lora_weights={init!r} (it replaces the base weight by a residual)")
    if cfg.get("alora_invocation_tokens"):
        unsupported.append("alora_invocation_tokens (activated LoRA applies only after those tokens)")
    # PEFT LoRA variants whose update is more than B·A on the layers the config names: say which one, instead of
    # failing later on a weight's name or shape
    variants = {"use_qalora": "QA-LoRA (pooled inputs)", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
                "kasa_config": "KaSA (an extra diagonal)", "use_bdlora": "BD-LoRA (block-diagonal factors)",
                "arrow_config": "Arrow (routing over several LoRAs)", "megatron_config": "Megatron-parallel layers",
                "layer_replication": "layer_replication (the adapter's model has duplicated layers)",
                "trainable_token_indices": "trainable_token_indices (trained embedding rows, not a LoRA)"}
    unsupported += [f"{field} = {what}" for field, what in variants.items() if cfg.get(field)]
    if unsupported:
        raise ValueError(f"The PEFT adapter uses {unsupported}: its update is not a plain B·A on the original base "
                         "weights of the named layers, so LoRA² cannot reproduce it. (For PiSSA/OLoRA-style adapters, "
                         "PEFT can convert them to plain LoRA: save with path_initial_model_for_weight_conversion.)")
    if not (directory / PEFT_WEIGHTS_NAME).is_file():
        hint = " Only safetensors are read (no pickles): re-save it with a recent PEFT." \
            if (directory / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"Missing {directory / PEFT_WEIGHTS_NAME}.{hint}")
    if getattr(model, "_unloaded", False) or any(layer.merged for layer in model.lora2_layers.values()):
        raise RuntimeError("init_from_peft_lora needs an unmerged LoRA2Model.")
    if model.allocator.num_updates > 0 or bool((model.allocator.masks() < 1).any()):
        raise RuntimeError("init_from_peft_lora initialises a fresh LoRA2Model: this one has already pruned.")

    tensors = read_tensors(directory / PEFT_WEIGHTS_NAME)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = value
        elif ".lora_" in name:
            raise ValueError(f"{key} is not a Linear LoRA weight (embedding/conv LoRA); LoRA² cannot import it.")
        else:
            saved[name] = value
    unknown = sorted(n for n in pairs if n not in model.lora2_layers)
    if unknown:
        raise ValueError(f"The PEFT adapter adapts {unknown[:3]}{' ...' if len(unknown) > 3 else ''}, which this "
                         "LoRA2Model does not adapt; add them to LoRA2Config.target_modules.")
    base = model.get_base_model()
    outside = sorted(n for n in saved if not any(n.startswith(m + ".") for m in model.modules_to_save_names))
    if outside:
        raise ValueError(f"The PEFT adapter saves {outside[:3]} (modules_to_save) but this LoRA2Model does not train "
                         "those modules; add them to LoRA2Config.modules_to_save.")
    wanted = {n: t for n, t in base.state_dict().items() if n in saved}
    tied, params = tied_parameters(base), dict(base.named_parameters(remove_duplicate=False))
    for n in saved:
        others = [o for o in tied.get(id(params[n]), []) if o != n] if n in params else []
        if others and not all(o in saved for o in others):
            raise ValueError(f"modules_to_save tensor {n} is tied to {others[0]} in this base model, but the PEFT "
                             "adapter holds an untied copy: copying it in would change that module too. Untie the "
                             "base model's weights first (config.tie_word_embeddings=False).")
    for n, t in saved.items():
        if n not in wanted or tuple(wanted[n].shape) != tuple(t.shape):
            raise ValueError(f"modules_to_save tensor {n} {tuple(t.shape)} does not fit this base model.")

    alpha0, r0 = cfg.get("lora_alpha", 8), cfg.get("r", 8)
    plan = []
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"The PEFT adapter has only {sorted(ab)} for {name}; it is corrupted.")
        a, b = ab["lora_A"], ab["lora_B"]
        layer = model.lora2_layers[name]
        m = a.shape[0]
        if tuple(a.shape) != (m, layer.d_in) or tuple(b.shape) != (layer.d_out, m):
            raise ValueError(f"{name}: PEFT lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                             f"{layer.d_out}×{layer.d_in} layer.")
        if m > layer.k or m > layer.r:
            raise ValueError(f"{name}: the PEFT LoRA has rank {m}, but a LoRA² matrix with k={layer.k}, r={layer.r} "
                             f"holds rank ≤ min(k, r); use k ≥ {m} and r ≥ {m}.")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, alpha0)
        r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, name, r0)
        if r_cfg != m:
            raise ValueError(f"{name}: adapter_config.json says rank {r_cfg} but the weights have rank {m}; corrupted.")
        scaling = alpha / math.sqrt(m) if cfg.get("use_rslora") else alpha / m
        plan.append((layer, a, b, m, scaling))

    with torch.no_grad():
        for layer, a, b, m, scaling in plan:
            dtype, device = layer.p_outer.dtype, layer.p_outer.device
            eye = torch.eye(layer.k, m, dtype=dtype, device=device)
            layer.p_outer[:, :m] = a.T.to(device=device, dtype=dtype)
            layer.q_outer[:m] = (b.double().T * scaling).to(device=device, dtype=dtype)
            layer.q_outer[m:] = 0
            layer.p_inner[:, :m] = eye
            layer.q_inner[:m] = eye.T
            layer.lam.zero_()
            layer.lam[:m] = 1.0 / layer.scaling
        for n, t in saved.items():
            wanted[n].copy_(t.to(device=wanted[n].device, dtype=wanted[n].dtype))
    return list(pairs)
