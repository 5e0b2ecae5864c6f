"""The ``distrib-rda`` command: ``train``, ``data convert``, ``tune``, ``pareto`` and ``export``.

Training flags are generated from :class:`~distrib_rda.config.TrainConfig`, so the command line and
YAML files share one schema: ``--batch-size`` is the key ``batch_size``. Bad input ends with one
line naming the culprit and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from distrib_rda.config import ConfigError, TrainConfig, config_fields, flag_name, load_yaml
from distrib_rda.errors import UserError
from distrib_rda.optimizers import OPTIMIZERS


def _parse_epochs(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epoch numbers such as 10,20, got {text!r}"
        ) from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _base_type(annotation: Any) -> Any:
    """``int`` for ``Annotated[int, ...] | None``, and so on."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return _base_type(args[0])
    return annotation


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
# What a person would write after the flag, where the key's own name does not say it.
METAVARS = {"model": "SPEC", "dataset": "NAME", "optimizer": "NAME", "experiment": "NAME",
            "name": "NAME", "register": "NAME", "address": "HOST:PORT", "tracking_uri": "URI",
            "target_sparsity": "S", "init_scale": "X", "lambda_": "LAMBDA", "data_root": "DIR",
            "cache_dir": "DIR", "storage": "DIR"}


def _range(field: FieldInfo) -> str:
    """``">= 0, < 1"`` from a field's constraints."""
    parts = []
    for item in field.metadata:
        for attribute, symbol in _BOUNDS:
            value = getattr(item, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value:g}" if isinstance(value, float) else
                             f"{symbol} {value:,}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _help(key: str, owners: list[tuple[str | None, FieldInfo]]) -> str:
    """The description, then the default(s) and range: ``[rda, gmp] ... (default: ...)``."""
    field = owners[0][1]
    text = field.description or key.replace("_", " ")
    if owners[0][0] is None:
        facts = [f"default: {_default(field)}"]
    else:
        text = f"[{', '.join(name for name, _ in owners)}] {text}"
        defaults = {name: _default(f) for name, f in owners}
        if len(set(defaults.values())) == 1:
            facts = [f"default: {next(iter(defaults.values()))}"]
        else:
            facts = ["default: " + "; ".join(f"{name} {value}" for name, value in
                                              defaults.items())]
    if _range(field):
        facts.append(_range(field))
    return f"{text} ({'; '.join(facts)})".replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (common and every optimizer's), with its default and range.
    Unset flags stay ``None`` (= keep the default)."""
    group = parser.add_argument_group(
        "training config (also YAML keys; [names] mark an optimizer's own keys)")
    for key, owners in config_fields().items():
        field = owners[0][1]
        kind = _base_type(field.annotation)
        kwargs: dict[str, Any] = {"dest": key, "default": None, "help": _help(key, owners),
                                  "metavar": METAVARS.get(key, key.upper())}
        if kind is bool:
            del kwargs["metavar"]
            group.add_argument(flag_name(key), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if key == "restart":
            kwargs.update(type=_parse_epochs, metavar="EPOCHS")
        elif typing.get_origin(kind) is tuple:
            kwargs.update(type=_parse_float, nargs=2, metavar=("START", "END"))
        elif typing.get_origin(kind) is typing.Literal:
            kwargs.update(choices=list(typing.get_args(kind)), metavar=None)
        elif key == "optimizer":
            kwargs.update(choices=list(OPTIMIZERS))
        elif kind is float:
            kwargs.update(type=_parse_float)
        elif kind is int:
            kwargs.update(type=_parse_int, metavar="N")
        elif kind is Path:
            kwargs.update(type=Path)
        group.add_argument(flag_name(key), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the ``--config`` YAML, then the flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    values.update(config_overrides(args))
    return TrainConfig.build(**values)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys that were given as flags."""
    return {key: getattr(args, key) for key in config_fields()
            if getattr(args, key, None) is not None}


# Each command checks its input (distrib_rda.preflight) before it imports torch, Ray or
# MLflow, which take seconds: bad input is refused at once, and nothing is written.


def _cmd_train(args: argparse.Namespace) -> None:
    from distrib_rda import preflight
    from distrib_rda.terminal import say

    cfg = config_from_args(args)
    plan = preflight.check_train(cfg)
    say(f"{'resuming' if plan.resumed else 'starting'} {plan.cfg.name}: {cfg.model} on "
        f"{cfg.dataset} with {cfg.optimizer}; loading torch, Ray and MLflow ...")
    from distrib_rda.training import run_training

    run_training(cfg, json_output=args.json, stop_ray=True)


def _cmd_convert(args: argparse.Namespace) -> None:
    from distrib_rda.data.convert import convert
    from distrib_rda.terminal import say

    say(f"converting {args.dataset} into {args.out} ...")
    convert(args.dataset, args.out, data_root=args.data_root, download=args.download,
            force=args.force, image_size=args.image_size)


def _cmd_tune(args: argparse.Namespace) -> None:
    from distrib_rda import preflight
    from distrib_rda.locations import resolve_locations
    from distrib_rda.search.space import load_space
    from distrib_rda.terminal import say

    spec = load_space(args.space, overrides=config_overrides(args), trials=args.trials,
                      max_concurrent=args.max_concurrent)
    spec.base = resolve_locations(spec.base)
    preflight.check_search(spec, resume=args.resume)
    say(f"{'resuming' if args.resume else 'starting'} search '{spec.name}': {spec.trials} "
        f"trials; loading torch, Ray and MLflow ...")
    from distrib_rda.search.tune import run_search

    run_search(spec, resume=args.resume, stop_ray=True)


def _cmd_pareto(args: argparse.Namespace) -> None:
    from distrib_rda.locations import default_tracking_uri
    from distrib_rda.preflight import check_pareto

    check_pareto(default_tracking_uri(args.tracking_uri), args.out, force=args.force)
    from distrib_rda.search import pareto_report

    pareto_report([args.experiment, *args.compare], tracking_uri=args.tracking_uri, out=args.out,
                  force=args.force)


def _cmd_export(args: argparse.Namespace) -> None:
    from distrib_rda.locations import default_tracking_uri
    from distrib_rda.preflight import check_export
    from distrib_rda.terminal import say

    check_export(args.source, args.out, default_tracking_uri(args.tracking_uri),
                 force=args.force)
    say(f"exporting {args.source} to {args.out} ...")
    from distrib_rda.export import export_sparse

    export_sparse(args.source, args.out, tracking_uri=args.tracking_uri, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distrib-rda", description="Train sparse CNNs with l1-RDA on Ray.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    train = verbs.add_parser("train", help="train one model on Ray Train, logged to MLflow")
    train.add_argument("--config", type=Path, metavar="FILE",
                       help="YAML file of config keys; flags override it (default: none)")
    train.add_argument("--json", action="store_true",
                       help="end standard output with one JSON line of the results "
                            "(default: off)")
    add_config_flags(train)
    train.set_defaults(run=_cmd_train)

    data = verbs.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_verb", required=True, metavar="COMMAND")
    convert = data.add_parser("convert", help="write DIR/train.beton, test.beton and meta.json")
    convert.add_argument("dataset", metavar="DATASET",
                         help="fashion-mnist, mnist, cifar10, cifar100 or imagefolder:PATH")
    convert.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="the directory to write (required)")
    convert.add_argument("--data-root", type=Path, metavar="DIR",
                         help="where torchvision-layout datasets live (default: none)")
    convert.add_argument("--download", action="store_true",
                         help="let torchvision download a missing dataset (default: off)")
    convert.add_argument("--image-size", type=_parse_int, metavar="N",
                         help=_help("image_size", config_fields()["image_size"]))
    convert.add_argument("--force", action="store_true",
                         help="overwrite an existing output (default: off)")
    convert.set_defaults(run=_cmd_convert)

    tune = verbs.add_parser("tune", help="search a tune/ space with Ray Tune")
    tune.add_argument("space", type=Path, metavar="SPACE",
                      help="a search-space YAML, such as tune/fashion_mnist_lenet5.yaml")
    tune.add_argument("--trials", type=_parse_int, metavar="N",
                      help="number of trials (default: the file's search.trials, else 8; >= 1)")
    tune.add_argument("--max-concurrent", type=_parse_int, metavar="N",
                      help="trials running at once (default: the file's "
                           "search.max_concurrent, else 1; >= 1)")
    tune.add_argument("--resume", action="store_true",
                      help="continue an interrupted search (default: off)")
    add_config_flags(tune)
    tune.set_defaults(run=_cmd_tune)

    pareto = verbs.add_parser("pareto", help="print and plot sparsity/accuracy fronts from MLflow")
    pareto.add_argument("--experiment", required=True, metavar="NAME",
                        help="the MLflow experiment (required)")
    pareto.add_argument("--compare", nargs="*", default=[], metavar="NAME",
                        help="more experiments to overlay (default: none)")
    pareto.add_argument("--tracking-uri", default="sqlite:///mlflow.db", metavar="URI",
                        help="the MLflow store to read, never created (default: "
                             "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    pareto.add_argument("--out", type=Path, metavar="FILE",
                        help="write the overlaid fronts to this image, its type by the suffix: "
                             ".png, .pdf, .svg, ... (default: none)")
    pareto.add_argument("--force", action="store_true",
                        help="overwrite an existing --out (default: off)")
    pareto.set_defaults(run=_cmd_pareto)

    export = verbs.add_parser("export", help="write a model's non-zeros in a sparse format")
    export.add_argument("source", metavar="SOURCE",
                        help="an MLflow run id, or a checkpoint file or directory")
    export.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the sparse file to write (required)")
    export.add_argument("--tracking-uri", default="sqlite:///mlflow.db", metavar="URI",
                        help="where a run id is looked up, never created (default: "
                             "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    export.add_argument("--force", action="store_true",
                        help="overwrite an existing --out (default: off)")
    export.set_defaults(run=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, ConfigError) as error:
        print(f"distrib-rda: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distrib-rda: interrupted", file=sys.stderr)
        return 130
    return 0


def exit_quickly(code: int) -> typing.NoReturn:
    """Exit with ``code`` once everything is written, without the interpreter's teardown.

    The threads still running are joined and the exit handlers run (``ray.shutdown``, MLflow's
    and logging's flushes), as at a normal exit; what is skipped is the finalization of every
    module and object, which took 3-4 s of each command's wall time with torch, Ray and MLflow
    loaded, and writes nothing."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what the interpreter runs at exit; atexit has no public name
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`distrib-rda ... | head`) or stream
            pass
    os._exit(code)


def console() -> typing.NoReturn:
    """The ``distrib-rda`` command: :func:`main`, then :func:`exit_quickly`. An exception that
    :func:`main` does not handle ends the command as in any Python program, with its
    traceback."""
    exit_quickly(main())


if __name__ == "__main__":
    console()
