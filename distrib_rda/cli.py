"""The ``distrib-rda`` command: ``train``, ``data convert``, ``tune``, ``pareto`` and ``export``.

Training flags are generated from :class:`~distrib_rda.config.TrainConfig`, so the command line and
YAML files share one schema: ``--batch-size`` is the key ``batch_size``. Bad input ends with one
line naming the culprit and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

from distrib_rda.config import ConfigError, TrainConfig, flag_name, load_yaml
from distrib_rda.errors import UserError


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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` key. Unset flags stay ``None`` (= keep the default)."""
    group = parser.add_argument_group("training config (also YAML keys)")
    for key, field in TrainConfig.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        help_text = field.description or ""
        if annotation is bool or (bool in args and key == "augment"):
            group.add_argument(
                flag_name(key), dest=key, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )
            continue
        kwargs: dict[str, Any] = {"dest": key, "default": None, "help": help_text}
        if key == "restart":
            kwargs["type"] = _parse_epochs
            kwargs["metavar"] = "EPOCHS"
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif annotation is float or float in args:
            kwargs["type"] = _parse_float
        elif annotation is int or int in args:
            kwargs["type"] = _parse_int
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
    return {
        key: getattr(args, key)
        for key in TrainConfig.model_fields
        if getattr(args, key, None) is not None
    }


def _cmd_train(args: argparse.Namespace) -> None:
    from distrib_rda.training import run_training

    run_training(config_from_args(args), json_output=args.json)


def _cmd_convert(args: argparse.Namespace) -> None:
    from distrib_rda.data import convert

    convert(args.dataset, args.out, data_root=args.data_root, download=args.download,
            force=args.force)


def _cmd_tune(args: argparse.Namespace) -> None:
    from distrib_rda.search import run_search

    run_search(args.space, trials=args.trials, max_concurrent=args.max_concurrent,
               resume=args.resume, overrides=config_overrides(args))


def _cmd_pareto(args: argparse.Namespace) -> None:
    from distrib_rda.search import pareto_report

    pareto_report([args.experiment, *args.compare], tracking_uri=args.tracking_uri, out=args.out)


def _cmd_export(args: argparse.Namespace) -> None:
    from distrib_rda.export import export_sparse

    export_sparse(args.source, args.out, tracking_uri=args.tracking_uri, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distrib-rda", description="Train sparse CNNs with l1-RDA on Ray.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    train = verbs.add_parser("train", help="train one model on Ray Train, logged to MLflow")
    train.add_argument("--config", type=Path, help="YAML file of config keys; flags override it")
    train.add_argument("--json", action="store_true",
                       help="end standard output with one JSON line of the results")
    add_config_flags(train)
    train.set_defaults(run=_cmd_train)

    data = verbs.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_verb", required=True, metavar="COMMAND")
    convert = data.add_parser("convert", help="write DIR/train.beton, test.beton and meta.json")
    convert.add_argument("dataset",
                         help="fashion-mnist, mnist, cifar10, cifar100 or imagefolder:PATH")
    convert.add_argument("--out", type=Path, required=True)
    convert.add_argument("--data-root", type=Path)
    convert.add_argument("--download", action="store_true")
    convert.add_argument("--force", action="store_true", help="overwrite an existing output")
    convert.set_defaults(run=_cmd_convert)

    tune = verbs.add_parser("tune", help="search a tune/ space with Ray Tune")
    tune.add_argument("space", type=Path,
                      help="a search-space YAML, such as tune/fashion_mnist_lenet5.yaml")
    tune.add_argument("--trials", type=_parse_int, help="number of trials (default: the file's)")
    tune.add_argument("--max-concurrent", type=_parse_int, help="trials running at once")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted search")
    add_config_flags(tune)
    tune.set_defaults(run=_cmd_tune)

    pareto = verbs.add_parser("pareto", help="print and plot sparsity/accuracy fronts from MLflow")
    pareto.add_argument("--experiment", required=True)
    pareto.add_argument("--compare", nargs="*", default=[], metavar="NAME")
    pareto.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    pareto.add_argument("--out", type=Path, help="write the overlaid fronts to this PNG")
    pareto.set_defaults(run=_cmd_pareto)

    export = verbs.add_parser("export", help="write a model's non-zeros in a sparse format")
    export.add_argument("source", help="an MLflow run id, or a checkpoint file or directory")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    export.add_argument("--force", action="store_true", help="overwrite an existing output")
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


if __name__ == "__main__":
    sys.exit(main())
