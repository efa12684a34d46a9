"""The `vitkit` command line: one sub-command per task, mirroring the Python API.

Each sub-command is a pair `_add_<name>(subparsers)` / `_run_<name>(args)`; commands that live with their
task (train, eval, demo, bench, explain) register themselves through `COMMAND_MODULES`: a module there
exposes `add_commands(subparsers)` and sets `func` on each parser it adds.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

COMMAND_MODULES = ("vitkit.train.commands", "vitkit.bench.commands", "vitkit.explain.commands",
                   "vitkit.robust.commands", "vitkit.distill.commands",
                   "vitkit.compress._commands", "vitkit.pretrain.commands",
                   "vitkit.adapt._commands")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm name, hf-hub: id, weights file, save folder or embedded name")
    parser.add_argument("--arch", help="timm architecture for a weights file (inferred when omitted)")
    parser.add_argument("--num-classes", type=int, help="classifier size (new head when it differs)")
    parser.add_argument("--no-pretrained", action="store_true", help="random weights for timm names")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra timm/VisionTransformer argument, e.g. num_heads=4 (repeatable)")


def yaml_load(text: str):
    """YAML with YAML 1.2's numbers: PyYAML follows YAML 1.1, where `3e-4` is a string (only `3.0e-4` is a float)
    and `2:4` is the base-60 integer 124; recipes and `--set` values mean the float and the string."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number_tags = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in rules if tag not in number_tags]
                                      for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(number_tags[0], re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver(number_tags[1], re.compile(
        r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
        r"|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def parse_value(text: str):
    """'4' -> 4, '0.5' -> 0.5, '3e-4' -> 0.0003, '2:4' -> '2:4', 'true' -> True, '[1,2]' -> [1, 2], else the
    string (YAML 1.2 rules, `yaml_load`)."""
    return yaml_load(text)


def yaml_problem(err: Exception) -> str:
    """Where a YAML syntax error is and what it is: ' at line 3, column 7: mapping values are not allowed here'."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {getattr(err, 'problem', None) or str(err).splitlines()[0]}"


def parse_pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def load_model(args: argparse.Namespace):
    import vitkit as vk

    extra = parse_pairs(args.model_arg)
    num_classes = args.num_classes if args.num_classes is not None else extra.pop("num_classes", None)
    return vk.load(args.model, arch=args.arch, num_classes=num_classes, pretrained=not args.no_pretrained, **extra)


def apply_specs(model, specs: list[str]):
    """Apply `NAME[:k=v,...]` method specs in order (the `--method` flag of every command)."""
    import vitkit as vk

    for spec in specs:
        name, _, rest = spec.partition(":")
        vk.apply(model, name, **parse_pairs([p for p in rest.split(",") if p]))
    return model


def _run_info(args: argparse.Namespace) -> None:
    import vitkit as vk

    if not any(pair.startswith("any_model=") for pair in args.model_arg):
        args.model_arg = [*args.model_arg, "any_model=true"]  # vk.info reports any timm model (no token layout)
    model = apply_specs(load_model(args), args.method)
    info = vk.info(model, input_size=args.input_size)
    print(info)
    if args.json:
        print(json.dumps({"total_params": info.total_params, "trainable_params": info.trainable_params,
                          "gmacs": info.gmacs, "num_prefix_tokens": info.layout and info.layout.num_prefix_tokens,
                          "methods": info.methods}, indent=2))


def _run_methods(args: argparse.Namespace) -> None:
    import vitkit as vk

    from rich.console import Console
    from rich.table import Table

    table = Table(title="vitkit methods")
    for column in ("name", "kind", "config (default)", "what it is"):
        table.add_column(column, overflow="fold")  # long defaults wrap onto the next line, never truncated
    for method in vk.methods(args.kind):
        fields = "\n".join(f"{n}={d!r}  {h}" for n, _, d, h in method.fields()) or "-"
        table.add_row(method.name, method.kind, fields, method.doc)
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Pretrained Vision Transformers: adapt, accelerate, "
                                     "compress, explain, benchmark.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    parser.add_argument("--debug", action="store_true", help=f"show the full traceback of an error, anywhere on the "
                        f"line (or set {DEBUG_ENV}=1); without it an error is one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, FLOPs, token layout and methods of a model")
    _model_args(p)
    p.add_argument("--input-size", type=int, help="input size in pixels (default: the model's)")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]", help="apply a method first")
    p.add_argument("--json", action="store_true", help="also print JSON")
    p.set_defaults(func=_run_info)

    p = sub.add_parser("methods", help="list registered methods and their configs")
    from vitkit.registry import KINDS

    p.add_argument("--kind", choices=KINDS, help="only this kind")
    p.set_defaults(func=_run_methods)

    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # that task is not built yet
            raise
        module.add_commands(sub)
    return parser


DEBUG_ENV = "VITKIT_DEBUG"


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a value, a file, a recipe, a diverging run): one line, exit status 2.

    Anything else is a bug in vitkit: one line too (exit status 1) that says how to see the traceback.
    """
    import yaml

    from vitkit.train.fit import NonFiniteLossError

    return ValueError, TypeError, NotImplementedError, RuntimeError, OSError, yaml.YAMLError, NonFiniteLossError


def report_error(command: str, err: BaseException) -> int:
    """Print `err` as one line on stderr; return the exit status (2: bad input, 1: a bug, 130: interrupted)."""
    if isinstance(err, KeyboardInterrupt):
        print(f"vitkit {command}: interrupted; what finished is saved (run the same command with --resume where "
              "the command has it, to continue)", file=sys.stderr)
        return 130
    message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message holds
    if isinstance(err, user_errors()):
        name = type(err).__name__
        prefix = "" if name in ("ValueError", "TypeError", "RuntimeError", "OSError") else f"{name}: "
        print(f"vitkit {command}: error: {prefix}{message}", file=sys.stderr)
        return 2
    print(f"vitkit {command}: internal error: {type(err).__name__}: {message} (a bug in vitkit; run with --debug "
          f"or {DEBUG_ENV}=1 for the traceback and report it)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, also after the sub-command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the command line prints errors, never tracebacks
        if args.verbose or debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        return report_error(args.command, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
