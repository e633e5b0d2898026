"""Which modules of a model get a LoRA² layer, and which are trained in full (``modules_to_save``).

Names match as dotted suffixes (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``)
or, when ``target_modules`` is one string, as a regex over the full name. Every dead end raises
with what the model does have, so a typo costs one run of the constructor, not a silent no-op.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from .config import DEFAULT_TARGET_MODULES
from .layer import SUPPORTED_TYPES

# Class-name endings of 🤗 models → PEFT task_type (PeftModel.from_pretrained picks its wrapper from it).
TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)
# The task heads of these task types (PEFT adds them to modules_to_save; lora2 warns when one stays frozen).
TASK_HEADS = {"SEQ_CLS": frozenset({"classifier", "score"}), "TOKEN_CLS": frozenset({"classifier", "score"}),
              "QUESTION_ANS": frozenset({"qa_outputs"})}


def task_type(class_name: str | None) -> str | None:
    """PEFT's task_type for a 🤗 model class name, from its ending (None: not a task model we know)."""
    return next((t for ending, t in TASK_TYPES if class_name and class_name.endswith(ending)), None)


def causal_lm_loss(model: nn.Module) -> bool:
    """Whether the model's loss is transformers' causal-LM loss (labels shifted by one, token-weighted with
    ``num_items_in_batch``), the rule the 🤗 Trainer uses to count a step's items."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers without the loss registry
        return False
    loss_type = getattr(model, "loss_type", None)
    return (isinstance(loss_type, str) and LOSS_MAPPING.get(loss_type) is ForCausalLMLoss
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def loss_uses_item_count(model: nn.Module) -> bool:
    """Whether the model's loss divides by the Trainer's ``num_items_in_batch``: what the model says
    (``accepts_loss_kwargs``), else a causal LM whose forward takes ``**kwargs`` (its loss is transformers'
    token-weighted causal loss)."""
    import inspect

    said = getattr(type(model), "accepts_loss_kwargs", None)
    if isinstance(said, bool):
        return said
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    # GPT-2's LM head has no loss_type and gets transformers' default loss, the causal one
    default_causal = getattr(model, "loss_type", "") is None and task_type(type(model).__name__) == "CAUSAL_LM"
    return takes_kwargs and (causal_lm_loss(model) or default_causal)


def suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(suffix_match(name, t) for t in targets)


def owner_of(root: nn.Module, name: str) -> nn.Module:
    parent_name, _, _ = name.rpartition(".")
    return root.get_submodule(parent_name) if parent_name else root


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    setattr(owner_of(root, name), name.rpartition(".")[2], module)


def paths_of(root: nn.Module, module: nn.Module) -> list[str]:
    """Every name under which ``module`` is reachable (more than one when one object is registered twice)."""
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is module and n]


def shared_paths(root: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[str]]:
    """name → every path of each layer that one object registers under several parents (a PEFT export cannot say
    that)."""
    return {name: paths for name, layer in layers.items() if len(paths := paths_of(root, layer)) > 1}


def swap_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` sits: a layer one object registers under two parents runs at both paths, and a
    merge into its shared weight keeps them equal."""
    for name in paths_of(root, old):
        set_submodule(root, name, new)


def linear_names(model: nn.Module, limit: int = 8) -> str:
    """A short list of the model's adaptable layer names, for error messages."""
    names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]
    short = sorted({n.split(".")[-1] if not n.split(".")[-1].isdigit() else n for n in names})
    shown = ", ".join(repr(s) for s in short[:limit])
    return shown + (", ..." if len(short) > limit else "") if shown else "(none: the model has no Linear/Conv1D layer)"


def default_targets(model: nn.Module) -> list[str]:
    """The "ALL" target set (method.md §7) of the model's type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default target_modules for model type {model_type!r}: set LoRA2Config.target_modules "
            f"to names of its linear layers, e.g. some of {linear_names(model)}."
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def find_modules_to_save(model: nn.Module, wanted: list[str] | None) -> list[str]:
    """Full names of the outermost modules matching ``wanted``; every entry must match something."""
    if not wanted:
        return []
    names = [n for n, _ in model.named_modules() if n and matches(n, wanted)]
    names = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]  # outermost only
    missing = [w for w in wanted if not any(suffix_match(n, w) for n in names)]
    if missing:
        top = sorted({n.split(".")[0] for n, _ in model.named_children()})
        raise ValueError(
            f"modules_to_save {missing} matched no module of {type(model).__name__}; its top-level modules are {top}."
        )
    return names


ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer of the backbone


# top-level parts of 🤗 task models that sit beside the backbone (heads, their projections)
HEAD_PARTS = frozenset({"classifier", "score", "qa_outputs", "lm_head", "projector", "pre_classifier",
                        "classification_head", "logits_proj", "sequence_summary", "proj_out"})


def all_linear(model: nn.Module) -> list[str]:
    """Full names of every Linear/Conv1D of the backbone: a 🤗 model's ``base_model_prefix`` part (so a task
    head beside it, ``lm_head`` or ``classifier``, is left out); a 🤗 model without that attribute (T5's
    question answering, Whisper's audio classification): all but its top-level head parts; any other module:
    every layer (as PEFT). Never the output embeddings."""
    prefix = getattr(model, "base_model_prefix", None)
    backbone = prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else None
    hf_heads = HEAD_PARTS if prefix and backbone is None else frozenset()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None

    def inside(name: str) -> bool:
        if backbone is not None:
            return name.startswith(backbone + ".")
        return name.split(".")[0] not in hf_heads

    return [n for n, m in model.named_modules() if n and isinstance(m, SUPPORTED_TYPES) and m is not output
            and inside(n)]


def find_targets(model: nn.Module, targets: list[str] | str, saved: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every module to adapt: matched, outside ``saved``, and a Linear/Conv1D. ``"all-linear"``:
    the backbone's linear layers (``all_linear``)."""
    expanded = targets == ALL_LINEAR
    if expanded:  # what a list would name: nothing trained in full, nothing an adapter cannot reach
        targets = [n for n in all_linear(model) if not any(n == s or n.startswith(s + ".") for s in saved)
                   and not isinstance(owner_of(model, n), nn.MultiheadAttention)]
        if not targets:
            raise ValueError(f"target_modules='all-linear' found no Linear/Conv1D layer in {type(model).__name__}'s "
                             "backbone outside modules_to_save; name the layers to adapt.")
    found: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name or not matches(name, targets):
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue  # trained in full already
        if isinstance(module, nn.Linear) and isinstance(owner_of(model, name), nn.MultiheadAttention):
            skipped.append(name)  # torch's attention reads out_proj.weight directly: an adapter there never runs
            continue
        if not isinstance(module, SUPPORTED_TYPES):
            raise TypeError(
                f"target_modules matched {name!r}, a {type(module).__name__}; LoRA² adapts only nn.Linear and "
                "transformers' Conv1D. Use a more specific suffix (e.g. 'attention.output.dense')."
            )
        found.append((name, module))
    if not found:
        inside_saved = [n for n, _ in model.named_modules() if n and matches(n, targets)]
        if inside_saved:
            raise ValueError(
                f"target_modules={targets!r} only matched modules inside modules_to_save ({inside_saved[:3]}), "
                "which are trained in full and never get an adapter. Target the backbone's linear layers."
            )
        hint = (" A string is one regular expression matched against the whole module name (e.g. r'.*\\.query'); "
                "for name suffixes pass a list, e.g. ['query', 'value']." if isinstance(targets, str) else "")
        raise ValueError(
            f"target_modules={targets!r} matched no module of {type(model).__name__}. "
            f"Its linear layers include {linear_names(model)}.{hint}"
        )
    fused = [(n, p) for n, p in model.named_parameters() if matches(n, targets)]
    if fused:  # a weight held as a bare parameter under a target's name, e.g. a mixture of experts' fused experts
        name, param = fused[0]
        warnings.warn(f"target_modules={targets!r} also names {len(fused)} parameter(s) that are not inside a Linear "
                      f"layer, e.g. {name!r} (a {tuple(param.shape)} tensor of "
                      f"{type(owner_of(model, name)).__name__}): fused weights such as a mixture of experts' routed "
                      "experts, which LoRA² cannot adapt. They stay frozen; only the Linear layers matched get "
                      "adapters.", UserWarning, stacklevel=4)
    if skipped:
        warnings.warn(f"target_modules matched {skipped[:3]}{' ...' if len(skipped) > 3 else ''}: the output "
                      "projection of a torch.nn.MultiheadAttention, whose forward reads its weight directly, so an "
                      "adapter there would never run. Left out.", UserWarning, stacklevel=4)
    if isinstance(targets, list) and not expanded:
        unused = [t for t in targets if not any(suffix_match(n, t) for n, _ in found) and
                  not any(suffix_match(n, t) for n in skipped)]
        names = [n for n, _ in model.named_modules() if n]
        saved_only = [t for t in unused if any(suffix_match(n, t) for n in names)]
        if saved_only:
            warnings.warn(f"target_modules entries {saved_only} match only modules in modules_to_save, which are "
                          "trained in full and get no adapter.", stacklevel=4)
        if [t for t in unused if t not in saved_only]:
            warnings.warn(f"target_modules entries {[t for t in unused if t not in saved_only]} matched no module "
                          "and were ignored.", stacklevel=4)
    return found


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → every name it has, for parameters that more than one module holds (tied weights, e.g. a
    language-model head that shares the input embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {pid: found for pid, found in names.items() if len(found) > 1}


def tied_adapted(root: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """name → another name of its base weight, for adapted layers whose weight something else also uses (a head
    tied to the input embeddings): an update merged into that weight would change the other module too. The same
    layer reached by two paths is no tie; the bare base layer at a second position is one."""
    tied = tied_parameters(root)
    found = {}
    for name, layer in layers.items():
        others = [n for n in tied.get(id(layer.base_layer.weight), [])
                  if not (n.endswith(".base_layer.weight")
                          and root.get_submodule(n[: -len(".base_layer.weight")]) is layer)]
        if others:
            found[name] = others[0]
    return found


def tied_outside(model: nn.Module, modules: list[str]) -> list[tuple[str, str]]:
    """(name inside ``modules``, a name of the same parameter outside them): ties a per-module copy would break."""
    def inside(name: str) -> bool:
        return any(name.startswith(m + ".") for m in modules)

    pairs = []
    for found in tied_parameters(model).values():
        ins, outs = [n for n in found if inside(n)], [n for n in found if not inside(n)]
        if ins and outs:
            pairs.append((ins[0], outs[0]))
    return pairs
