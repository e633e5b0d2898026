"""`lora2` command line: `lora2 glue ...` fine-tunes on a GLUE task, `lora2 export ...` writes a PEFT LoRA."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence

from . import __version__


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--dashed-flag`` per dataclass field, typed from the annotation, help from the metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in args if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kwargs: dict = {"dest": f.name, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        kwargs["type"] = kind
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default is not None and "default" not in help_text:
                kwargs["help"] = f"{help_text} [default: {f.default}]"
        parser.add_argument(flag, **kwargs)


def _glue(ns: argparse.Namespace) -> int:
    from .glue.run import GlueArgs, run_glue, summary_table

    args = GlueArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(GlueArgs)})
    results = run_glue(args)
    metric = results["main_metric"]
    print(summary_table([results]))
    print(f"dev {metric}: final {results['final'][metric]:.4f}, best {results['best'][metric]:.4f} "
          f"at step {results['best']['step']}")
    out = results["hyperparameters"]["output_dir"] or f"runs/{results['task']}-{results['method']}-s{results['seed']}"
    print(f"results: {out}/results.json")
    if results["heatmap"]:
        print(f"heatmap: {results['heatmap']}")
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
    from .glue.run import GlueArgs

    parser = argparse.ArgumentParser(prog="lora2", description="LoRA² fine-tuning tools.")
    parser.add_argument("--version", action="version", version=f"lora2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    glue = sub.add_parser("glue", help="Fine-tune and evaluate on a GLUE task.",
                          description="Fine-tune a model on a GLUE task with LoRA² or a baseline method "
                                      "(lora, adalora, sora, bitfit, full) and write results.json, the adapter, "
                                      "a training log and (LoRA²/AdaLoRA/SoRA) a rank heatmap.")
    add_dataclass_arguments(glue, GlueArgs)
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
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, TypeError) as err:
        print(f"lora2 {ns.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
