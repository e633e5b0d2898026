"""`lora2` command line: `lora2 glue ...` fine-tunes on a GLUE task, `lora2 export ...` writes a PEFT LoRA."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from . import __version__


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _field_type(annotation: Any) -> Any:
    """The argparse type of an annotation: Optional[X] → X, list[str] → comma-separated."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return _csv
    return annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, fields: Sequence[dataclasses.Field] | None = None,
                            unset_defaults: dict[str, str] | None = None) -> None:
    """One ``--dashed-flag`` per dataclass field, typed from the annotation, help from the metadata.

    ``unset_defaults``: the flags default to None (meaning "not set") and their help names the value
    used instead (``{field: text}``, else the field's own default).
    """
    hints = typing.get_type_hints(cls)
    for f in fields if fields is not None else dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        kind = _field_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kwargs: dict = {"dest": f.name, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        kwargs["type"] = f.metadata.get("parse", kind)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if unset_defaults is not None:
            shown = unset_defaults.get(f.name, ",".join(default) if isinstance(default, list) else default)
            kwargs["default"] = None
            kwargs["help"] = f"{help_text} [default: {shown}]"
        elif default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default is not None and "default" not in help_text:
                kwargs["help"] = f"{help_text} [default: {default}]"
        parser.add_argument(flag, **kwargs)


def glue_args_from_namespace(ns: argparse.Namespace) -> Any:
    """GlueArgs from parsed ``lora2 glue`` flags (LoRA2Config flags that were given go to ``lora2``)."""
    from .glue.args import GlueArgs

    return GlueArgs.from_flat({k: v for k, v in vars(ns).items() if k not in ("command", "func")})


GLUE_EXTRA = ("sklearn", "scipy", "matplotlib")


def _check_glue_extra() -> None:
    """`lora2 glue` needs the packages of the ``glue`` extra; the core library does not."""
    import importlib.util

    missing = [name for name in GLUE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"lora2 glue needs {', '.join(missing)}, which the core install leaves out: "
                           "pip install 'lora2[glue]'.")


def _glue(ns: argparse.Namespace) -> int:
    _check_glue_extra()
    from .glue.run import run_glue, summary_table

    results = run_glue(glue_args_from_namespace(ns))
    metric = results["main_metric"]
    print(summary_table([results]))
    print(f"dev {metric}: final {results['final'][metric]:.4f}, best {results['best'][metric]:.4f} "
          f"at step {results['best']['step']}")
    out = results["hyperparameters"]["output_dir"] or f"runs/{results['task']}-{results['method']}-s{results['seed']}"
    cut = results.get("truncated_by_max_length") or {}
    if cut:
        print(f"--max-length {results['hyperparameters']['max_length']} cut "
              + ", ".join(f"{c['count']} {split} examples ({100 * c['fraction']:.1f}%)" for split, c in cut.items()))
    print(f"results: {out}/results.json")
    print(f"learning curve: {results['learning_curve']}")
    if results["heatmap"]:
        print(f"heatmap: {results['heatmap']}")
    if math.isnan(results["final"][metric]):
        print("error: the trained model's dev predictions are NaN/inf (it diverged at the last steps); results.json "
              "records NaN metrics. Lower the learning rate or keep --max-grad-norm.", file=sys.stderr)
        return 1
    return 0


def _export(ns: argparse.Namespace) -> int:
    from .export import export_to_peft

    info = export_to_peft(ns.adapter, ns.out, exact_rank=ns.exact_rank, base_model_name_or_path=ns.base_model)
    ranks = sorted(info.ranks.values())
    print(f"PEFT LoRA adapter written to {info.out_dir}: {len(info.ranks)} matrices, "
          f"rank {ranks[0]}–{ranks[-1]}" + (" (exact ranks)" if info.exact_rank else ""))
    if info.dropped:
        print(f"left out {len(info.dropped)} matrices whose singular values were all pruned")
    if info.modules_to_save:
        print(f"modules_to_save carried over: {', '.join(info.modules_to_save)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import LoRA2Config
    from .glue.args import GlueArgs, lora2_option_fields

    parser = argparse.ArgumentParser(prog="lora2", description="LoRA² fine-tuning tools.")
    parser.add_argument("--version", action="version", version=f"lora2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    glue = sub.add_parser("glue", help="Fine-tune and evaluate on a GLUE task.",
                          description="Fine-tune a model on a GLUE task with LoRA² or a baseline method "
                                      "(lora, adalora, sora, bitfit, full, head) and write results.json, the adapter, "
                                      "a training log, a learning curve and (LoRA²/AdaLoRA/SoRA) a rank heatmap.")
    add_dataclass_arguments(glue, GlueArgs)
    lora2_flags = glue.add_argument_group(
        "LoRA² options", "Every LoRA2Config field (AdaLoRA shares the schedule fields, orth-reg-weight and dropout).")
    add_dataclass_arguments(lora2_flags, LoRA2Config, lora2_option_fields(), unset_defaults={
        "alpha": "32; 16 on sst2 (the paper's)", "target_rank": "2 (at most r)",
        "init_warmup": "15%% of the run (the paper's ratio)", "final_warmup": "45%% of the run (the paper's ratio)"})
    glue.set_defaults(func=_glue)
    export = sub.add_parser("export", help="Write a LoRA² adapter as a standard PEFT LoRA adapter.",
                            description="Convert a LoRA² adapter (a save_pretrained directory) into PEFT's LoRA format "
                                        "(adapter_config.json + adapter_model.safetensors), servable by any LoRA runtime.")
    export.add_argument("--adapter", required=True, help="LoRA² adapter directory (lora2_config.json + weights).")
    export.add_argument("--out", required=True, help="Directory for the PEFT adapter.")
    export.add_argument("--exact-rank", action="store_true",
                        help="Compress each matrix to its true rank (PEFT rank_pattern); drop fully pruned matrices.")
    export.add_argument("--base-model", default=None,
                        help="base_model_name_or_path to record (default: the one saved with the adapter).")
    export.set_defaults(func=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, OSError, RuntimeError, TypeError, FloatingPointError) as err:  # OSError: files, disk
        print(f"lora2 {ns.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
