"""The `cardkit` command line. The only module that prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from cardkit import __version__
from cardkit.errors import CardkitError

EPILOG = "User errors print one line and exit with code 2."
# the commands that run data-parallel under torchrun (the others would only repeat their work)
PARALLEL_COMMANDS = ("run", "train", "prune", "evaluate", "certify")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.nproc is not None and (args.nproc < 1 or (args.nproc > 1 and args.command not in PARALLEL_COMMANDS)):
        print(f"cardkit: error: --nproc {args.nproc}: give N >= 1 processes for one of "
              f"{', '.join(PARALLEL_COMMANDS)}", file=sys.stderr)
        return 2
    if args.nproc is not None and args.nproc > 1 and "RANK" not in os.environ:
        return _launch(args.nproc, argv)
    main_rank = os.environ.get("RANK", "0") == "0"
    if not main_rank:  # under torchrun, rank 0 alone prints results and errors
        sys.stdout = open(os.devnull, "w")
    _configure_logging(args.verbose, args.quiet)
    finished = False
    try:
        if args.plugin:
            from cardkit.config import import_plugins

            import_plugins(args.plugin)
        code = args.handler(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        finished = True
        return code
    except CardkitError as err:
        if main_rank:
            print(f"cardkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cardkit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cardkit ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as err:  # the file system refused (a path through a file, no space, no permission)
        where = f" '{err.filename}'" if err.filename else ""
        print(f"cardkit: error: cannot use{where}: {err.strerror or err}; check the path and its "
              f"permissions", file=sys.stderr)
        return 2
    finally:
        if "RANK" in os.environ:  # under torchrun: leave the process group before the interpreter exits
            from cardkit.distributed import shutdown

            shutdown(finished)


def _launch(nproc: int, argv: list[str]) -> int:
    """`cardkit --nproc N ...`: the same command in N data-parallel processes, started by torchrun's
    launcher (what `torchrun --standalone --nproc-per-node N -m cardkit ...` does)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from cardkit.engine.threads import available_cores

    rest = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=")
                                                 or (i > 0 and argv[i - 1] == "--nproc"))]
    # torchrun would set one thread per process; share this machine's cores instead, unless set
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "cardkit", *rest)
    except ChildFailedError as failed:  # the failing rank has said why
        return min((f.exitcode for f in failed.failures.values()), key=lambda c: (c <= 0, c)) or 1
    return 0


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """cardkit's own log lines (one per epoch, warnings) go to stderr; other libraries warn only."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cardkit")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cardkit", epilog=EPILOG,
                                     description="Compact, accurate and robust deep networks.")
    parser.add_argument("--version", action="version", version=f"cardkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (debug level)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="run the command in N data-parallel processes on this machine (torchrun; gloo on "
                             "CPU, one GPU each with nccl)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import a module that registers its own models, datasets, methods, "
                             "objectives or attacks (repeatable; a config's plugins: list does the same)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the stage pipeline of a config", epilog=EPILOG)
    _config_arguments(run)
    run.set_defaults(handler=_run)

    train = commands.add_parser("train", help="train a model (the pretrain stage only)", epilog=EPILOG)
    _config_arguments(train)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="measure clean and PGD accuracy of a checkpoint",
                                   epilog=EPILOG)
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR",
                          help="a run folder (runs/NAME), a stage's checkpoints folder or a checkpoint folder")
    evaluate.add_argument("--best", action="store_true",
                          help="use the best checkpoint (default: the run's evaluate.checkpoint)")
    evaluate.add_argument("--attack", nargs="+", metavar="NAME",
                          help=f"attacks run in order on the points still robust: "
                               f"{', '.join(_registry('attacks').names())} (default: the run's evaluate.attacks)")
    evaluate.add_argument("--eps", help="attack radius, e.g. 0.3 or 8/255 (default: the run's threat)")
    evaluate.add_argument("--norm", choices=["linf", "l2", "l1"], help="attack norm (default: the run's threat)")
    evaluate.add_argument("--steps", type=int, help="PGD steps")
    evaluate.add_argument("--restarts", type=int, help="PGD restarts")
    evaluate.add_argument("--step-size", help="PGD step size (default 2.5 eps / steps)")
    evaluate.add_argument("--loss", choices=["ce", "dlr", "cw"], help="PGD loss")
    evaluate.add_argument("--version", choices=["standard", "plus", "rand"], help="AutoAttack version")
    evaluate.add_argument("--samples", type=int, help="evaluate on this many samples of the split")
    evaluate.add_argument("--split", choices=["test", "val"], help="data split")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of the stored config, e.g. data.data_dir=/data")
    evaluate.set_defaults(handler=_evaluate)

    prune = commands.add_parser("prune", help="prune a trained model, fine-tune and evaluate it",
                                epilog=EPILOG)
    prune.add_argument("--checkpoint", required=True, metavar="DIR",
                       help="a run folder (runs/NAME) or its pretrain checkpoint")
    prune.add_argument("--method", required=True,
                       help=f"pruning method: {', '.join(_registry('methods').names())} "
                            f"(`cardkit methods` describes them)")
    prune.add_argument("--sparsity", help="fraction of weights removed, e.g. 0.99")
    prune.add_argument("--size-ratio", help="atmc: compressed / dense fp32 size, e.g. 0.01 (instead of --sparsity)")
    prune.add_argument("--scope", choices=["layer", "global", "structured"],
                       help="same sparsity in every layer (default), one global threshold, or whole "
                            "channels removed and the model rebuilt smaller")
    prune.add_argument("--bits", type=int, help="quantize the kept weights to this many bits (1-8); "
                                                "for atmc: its codebook bits")
    prune.add_argument("--quantizer", choices=["uniform", "kmeans"],
                       help="with --bits: symmetric uniform levels (default) or a k-means codebook")
    prune.add_argument("--per-channel", action="store_true", help="with --bits: one uniform scale per output channel")
    prune.add_argument("--no-finetune", action="store_true", help="skip fine-tuning under the mask")
    prune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the stored config, e.g. prune.epochs=20")
    prune.add_argument("--no-progress", action="store_true", help="hide progress bars")
    prune.set_defaults(handler=_prune)

    certify = commands.add_parser("certify", help="verified accuracy of a checkpoint under Linf bounds",
                                  epilog=EPILOG)
    certify.add_argument("--checkpoint", required=True, metavar="DIR",
                         help="a run folder, a variant folder (runs/NAME/hydra-0.9) or a checkpoint folder")
    certify.add_argument("--method", required=True,
                         help=f"Linf bounds ({', '.join(_registry('bounds').names())}; `cardkit bounds` "
                              f"describes them), or smoothing: L2 certification of the Gaussian-smoothed model")
    certify.add_argument("--sigma", type=float, default=0.25, help="smoothing noise level")
    certify.add_argument("--n0", type=int, default=100, help="smoothing: selection samples")
    certify.add_argument("--n", type=int, default=10000, help="smoothing: estimation samples")
    certify.add_argument("--alpha", type=float, default=0.001, help="smoothing: failure probability")
    certify.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                         help="smoothing: L2 radii at which to report certified accuracy")
    certify.add_argument("--eps", help="Linf radius, e.g. 0.1 or 2/255 (default: the run's threat)")
    certify.add_argument("--samples", type=int, help="certify this many samples of the split")
    certify.add_argument("--split", choices=["test", "val"], help="data split")
    certify.add_argument("--best", action="store_true", help="use the best checkpoint instead of the last")
    certify.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a key of the stored config")
    certify.set_defaults(handler=_certify)

    corrupt = commands.add_parser("corrupt", help="write a corrupted copy of a dataset (CIFAR-10-C layout)",
                                  epilog=EPILOG)
    corrupt.add_argument("--data", default="cifar10", help="dataset name (see `cardkit datasets`)")
    corrupt.add_argument("--data-dir", default="data", help="folder of the dataset's files")
    corrupt.add_argument("--split", choices=["test", "train"], default="test", help="split to corrupt")
    corrupt.add_argument("--samples", type=int, help="corrupt a seeded subset of this many images")
    corrupt.add_argument("--corruptions", nargs="+", default=["all"], metavar="NAME",
                         help="corruption names, or benchmark (the 15), extras (the 4), all (default)")
    corrupt.add_argument("--seed", type=int, default=0, help="seed of the random corruptions")
    corrupt.add_argument("--files", nargs="+", metavar="FILE",
                         help="the split's files, relative to --data-dir (default: the official ones), "
                              "e.g. cifar-10-test-1k/test_batch_first1000.bin")
    corrupt.add_argument("--out", metavar="DIR", help="output folder (required unless --list)")
    corrupt.add_argument("--list", action="store_true", help="list the corruptions and exit")
    corrupt.set_defaults(handler=_corrupt)

    deck = commands.add_parser("deck", help="build and evaluate CARD-Decks", epilog=EPILOG)
    deck_commands = deck.add_subparsers(dest="deck_command", required=True, metavar="ACTION")
    build = deck_commands.add_parser("build", help="build a deck from a deck config", epilog=EPILOG)
    build.add_argument("config", help="deck YAML, e.g. configs/deck.yaml")
    build.set_defaults(handler=_deck_build)
    deck_eval = deck_commands.add_parser("evaluate", help="clean and corruption accuracy of a deck and its cards",
                                         epilog=EPILOG)
    deck_eval.add_argument("--deck", required=True, metavar="DIR", help="a deck folder (runs/NAME)")
    deck_eval.add_argument("--gating", choices=["fixed", "adaptive"], help="default: the deck's")
    deck_eval.add_argument("--k", type=int, help="adaptive gating: cards averaged per batch")
    deck_eval.add_argument("--distance", choices=["l2", "l1", "cosine"], help="spectral distance")
    _corruption_arguments(deck_eval)
    deck_eval.add_argument("--device", default="auto", help="auto, cpu or cuda")
    deck_eval.set_defaults(handler=_deck_evaluate)

    fourier = commands.add_parser("fourier", help="Fourier heat map of a checkpoint's error (PNG and JSON)",
                                  epilog=EPILOG)
    fourier.add_argument("--checkpoint", required=True, metavar="DIR", help="a run, variant or checkpoint folder")
    fourier.add_argument("--eps", type=float, default=4.0, help="L2 norm of the Fourier noise")
    fourier.add_argument("--samples", type=int, default=500, help="test images per frequency")
    fourier.add_argument("--seed", type=int, default=0)
    fourier.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a key of the stored config")
    fourier.set_defaults(handler=_fourier)

    size = commands.add_parser("size", help="the accounted compressed size of a checkpoint, tensor by tensor",
                               epilog=EPILOG)
    size.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="a run folder, a variant folder (runs/NAME/hydra-0.9) or a checkpoint folder")
    size.add_argument("--best", action="store_true", help="use the best checkpoint instead of the last")
    size.add_argument("--json", action="store_true", help="print the size report as JSON")
    size.set_defaults(handler=_size)

    imported = commands.add_parser("import", help="turn a published PyTorch state dict into a run folder",
                                   epilog=EPILOG)
    imported.add_argument("file", help="a state dict written by torch.save (.pt, .pth, .pth.tar), read with "
                                       "weights_only=True")
    imported.add_argument("--model", required=True, help="the registry model the file holds (`cardkit models`)")
    imported.add_argument("--data", required=True, help="the dataset it classifies (`cardkit datasets`)")
    imported.add_argument("--name", help="run name (default: the file name without its extensions)")
    imported.add_argument("--output-dir", default="runs", help="folder of the run folders (default: runs)")
    imported.add_argument("--layout", default="auto",
                          help="key names of the file: cardkit, wrn, preact_resnet, resnet, sequential "
                               "(default auto: the one that fits the model)")
    imported.add_argument("--sparsity", help="HYDRA files (popup_scores): the fraction of weights removed, "
                                             "1 - HYDRA's k, e.g. 0.99 for k 0.01")
    imported.add_argument("--normalize", choices=["auto", "dataset", "none"], default="auto",
                          help="input mean / std: auto (the file's own mu / sigma, else none: inputs in [0, 1] "
                               "as RobustBench models take them), the dataset's, or none")
    imported.add_argument("--mean", type=float, nargs="+", help="input mean per channel (with --std)")
    imported.add_argument("--std", type=float, nargs="+", help="input std per channel (with --mean)")
    imported.add_argument("--check-samples", type=int, default=500,
                          help="measure clean accuracy on this many test images after the import (0: skip)")
    imported.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="a config key of the new run, e.g. threat.eps=8/255 or data.data_dir=DIR")
    imported.set_defaults(handler=_import)

    export = commands.add_parser("export", help="write a checkpoint as one compressed file", epilog=EPILOG)
    export.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a run folder, a variant folder (runs/NAME/hydra-0.9) or a checkpoint folder")
    export.add_argument("--out", required=True, metavar="FILE", help="output file, e.g. model.card")
    export.add_argument("--format", choices=["card", "onnx"], default="card",
                        help="card: packed positions and codes, loaded by cardkit.load_artifact (default); "
                             "onnx: a dense ONNX model (needs the onnx extra)")
    export.add_argument("--best", action="store_true", help="use the best checkpoint instead of the last")
    export.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    export.set_defaults(handler=_export)

    report = commands.add_parser("report", help="a results table of finished runs", epilog=EPILOG)
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, e.g. runs/quickstart")
    report.add_argument("--markdown", action="store_true", help="print a Markdown table")
    report.set_defaults(handler=_report)

    for kind, what in LISTINGS.items():
        listing = commands.add_parser(kind, help=f"list the registered {what}", epilog=EPILOG)
        listing.set_defaults(handler=_listing, kind=kind)
    return parser


LISTINGS = {"models": "models", "datasets": "datasets", "methods": "pruning methods",
            "objectives": "training objectives", "attacks": "attacks", "corruptions": "corruptions",
            "bounds": "bound methods (evaluate.verify, cardkit certify)"}


def _registry(kind: str):
    """The registry a listing command shows (importing the package registers the built-ins)."""
    if kind == "models":
        from cardkit.models.registry import MODELS as registry
    elif kind == "datasets":
        from cardkit.data.registry import DATASETS as registry
    elif kind == "methods":
        from cardkit.prune.methods import METHODS as registry
    elif kind == "objectives":
        from cardkit.objectives import OBJECTIVES as registry
    elif kind == "attacks":
        from cardkit.attacks import ATTACKS as registry
    elif kind == "corruptions":
        from cardkit.corrupt.registry import CORRUPTIONS as registry, corruption_names

        corruption_names()  # loads the corruption modules
    else:
        from cardkit.certify.verify import BOUNDS as registry
    return getattr(registry, "registry", registry)


def _listing(args) -> int:
    """One line per entry: the name, and the first sentence of its docstring."""
    registry = _registry(args.kind)
    width = max(map(len, registry.names()), default=0)
    for name, entry in registry.items():
        print(f"{name:<{width}}  {_summary(entry, args.kind)}".rstrip())
    return 0


def _summary(entry, kind: str) -> str:
    if kind == "corruptions":
        from cardkit.corrupt.registry import BENCHMARK

        return "CIFAR-10-C benchmark" if entry.name in BENCHMARK else "held-out extra"
    text = " ".join((getattr(entry, "__doc__", None) or "").split())
    sentence = re.split(r"(?<!\bal)\.(?:\s|$)", text)[0]  # "et al." ends no sentence
    return sentence if len(sentence) <= 110 else sentence[:107] + "..."


def _corruption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corruptions", nargs="+", default=["benchmark"], metavar="NAME",
                        help="corruption names, or benchmark (the 15, default), extras, all")
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--samples", type=int, help="test images per corruption and severity")
    parser.add_argument("--suite", metavar="DIR",
                        help="folder of official <corruption>.npy files (CIFAR-10-C); default: generated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test subset and generated corruptions")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set pretrain.epochs=5 (repeatable)")
    parser.add_argument("--restart", action="store_true",
                        help="delete the run folder and start over instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage and method for 2 steps on a few images, in NAME-dry-run: checks that "
                             "a long config validates, finds its data and runs")


def _run(args, pipeline: list[str] | None = None) -> int:
    from cardkit.config import load_config
    from cardkit.engine import run_pipeline

    overrides = list(args.overrides)
    if pipeline is not None:
        overrides.append(f"pipeline={pipeline}")
    config = load_config(args.config, overrides)
    if args.dry_run:
        from cardkit.engine.dryrun import dry_run_config

        config = dry_run_config(config)
    result = run_pipeline(config, restart=args.restart, progress=not args.no_progress)
    _print_result(result)
    return 0


def _train(args) -> int:
    return _run(args, pipeline=["pretrain"])


def _evaluate(args) -> int:
    from cardkit.engine import evaluate_checkpoint

    flags = {"samples": "evaluate.samples", "split": "evaluate.split"}
    overrides = list(args.overrides) + [f"{key}={getattr(args, flag)}" for flag, key in flags.items()
                                        if getattr(args, flag) is not None]
    attacks = _attack_list(args)
    if attacks is not None:
        overrides.append(f"evaluate.attacks={json.dumps(attacks)}")
    result = evaluate_checkpoint(args.checkpoint, overrides, pointer="best" if args.best else None)
    _print_result(result)
    return 0


def _attack_list(args) -> list[dict] | None:
    """evaluate.attacks from --attack and the attack flags; None keeps the run's own list."""
    pgd = {k: getattr(args, k) for k in ("steps", "restarts", "step_size", "loss") if getattr(args, k) is not None}
    aa = {"version": args.version} if args.version else {}
    budget = {k: getattr(args, k) for k in ("eps", "norm") if getattr(args, k) is not None}
    names = args.attack or (["pgd"] if pgd else []) + (["autoattack"] if aa else [])
    if not names:
        if budget:
            raise CardkitError("--eps and --norm set an attack's budget: name the attacks with --attack, "
                               "e.g. --attack pgd autoattack")
        return None
    settings = {"pgd": pgd, "autoattack": aa}
    for name, own in settings.items():
        if own and name not in names:
            raise CardkitError(f"--{next(iter(own)).replace('_', '-')} applies to {name}, which --attack does "
                               f"not list; add it: --attack {' '.join(names + [name])}")
    return [{"name": name, **settings.get(name, {}), **budget} for name in names]


def _certify(args) -> int:
    from cardkit.engine import certify_checkpoint

    flags = {"eps": "evaluate.verify_eps", "samples": "evaluate.samples", "split": "evaluate.split"}
    overrides = list(args.overrides) + [f"{key}={getattr(args, flag)}" for flag, key in flags.items()
                                        if getattr(args, flag) is not None]
    if args.method != "smoothing":
        from cardkit.certify.verify import BOUNDS

        BOUNDS.canonical(args.method)  # an unknown method fails before the data loads
    smoothing = {"sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha, "radii": args.radii}
    folder, result = certify_checkpoint(args.checkpoint, args.method, overrides,
                                        pointer="best" if args.best else "last", smoothing=smoothing)
    if args.method == "smoothing":
        header = ["model folder", "sigma", "n", "samples", "abstain"] + [f"cert acc r={r:g}" for r in result.radii]
        row = [str(folder), f"{result.sigma:g}", str(result.n), str(result.samples), f"{result.abstain_rate:.4f}",
               *(f"{a:.4f}" for a in result.certified_accuracy)]
        print(format_table(header, [row]))
        return 0
    header = ["model folder", "method", "split", "samples", "linf eps", "clean acc", "verified acc", "seconds"]
    row = [str(folder), result.method, result.split, str(result.samples), f"{result.eps:.4g}",
           f"{result.clean_accuracy:.4f}", f"{result.verified_accuracy:.4f}", f"{result.seconds:.1f}"]
    print(format_table(header, [row]))
    return 0


def _prune(args) -> int:
    from cardkit.engine import prune_checkpoint
    from cardkit.numbers import parse_number
    from cardkit.prune import method_config

    _import_run_plugins(args.checkpoint)  # a method of the run's plugins is known from here on
    if args.size_ratio is not None and args.method != "atmc":
        raise CardkitError(f"--size-ratio is a budget of atmc; for {args.method} give --sparsity (and --bits)")
    if (args.sparsity is None) == (args.size_ratio is None):
        raise CardkitError("give --sparsity (the fraction of weights removed, e.g. 0.99), or for atmc "
                           "either --sparsity or --size-ratio")
    settings = {"sparsity": parse_number(args.sparsity)} if args.sparsity is not None else {
        "size_ratio": parse_number(args.size_ratio)}
    if args.scope:
        settings["scope"] = args.scope
    if args.bits is None and (args.quantizer or args.per_channel):
        given = "--quantizer " + args.quantizer if args.quantizer else "--per-channel"
        raise CardkitError(f"{given} applies to quantized weights: add --bits B (1-8), e.g. --bits 4")
    if args.bits is not None:
        settings.update({"bits": args.bits} if args.method == "atmc" else {"quantize": {
            "scheme": args.quantizer or "uniform", "bits": args.bits, "per_channel": args.per_channel}})
    try:
        method = method_config(args.method, **settings)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        problem = err.errors()[0] if hasattr(err, "errors") else {"msg": str(err)}
        loc = [str(part) for part in problem.get("loc", ["sparsity"])]
        message = problem["msg"].removeprefix("Value error, ")
        if not loc:  # a rule between options
            raise CardkitError(f"--method {args.method}: {message}") from None
        key = "bits" if "bits" in loc else loc[0].replace("_", "-")
        hint = " (sparsity is the fraction of weights removed, in [0, 1))" if key == "sparsity" else ""
        raise CardkitError(f"--{key} given {problem.get('input')!r}: {message}{hint}") from None
    result = prune_checkpoint(args.checkpoint, method, args.overrides, finetune=not args.no_finetune,
                              progress=not args.no_progress)
    _print_result(result)
    return 0


def _import_run_plugins(path: str) -> None:
    """Import the plugins listed in the config.yaml of the run folder that holds `path`."""
    import yaml

    from cardkit.config import import_plugins
    from cardkit.engine.rundir import MARKER

    folder = Path(path).resolve()
    for candidate in [folder, *folder.parents][:5]:
        if (candidate / "config.yaml").is_file() and (candidate / MARKER).exists():
            stored = yaml.safe_load((candidate / "config.yaml").read_text())
            import_plugins(stored.get("plugins") if isinstance(stored, dict) else None)
            return


def _corrupt(args) -> int:
    import time

    from cardkit.corrupt import corruption_names, expand_names
    from cardkit.corrupt.files import write_suite
    from cardkit.data import load_dataset

    if args.list:
        print("\n".join(corruption_names()))
        return 0
    if args.out is None:
        raise CardkitError("corrupt: give --out DIR, the folder to write the corrupted files to")
    names = expand_names(args.corruptions)
    files = {f"{args.split}_files": args.files} if args.files else {}
    sizes = {"test_size": args.samples} if args.split == "test" else {"train_size": args.samples}
    splits = load_dataset(args.data, args.data_dir, download=False, seed=args.seed, only=args.split,
                          **sizes, **files)
    dataset = getattr(splits, args.split)
    start = time.perf_counter()
    files = write_suite(dataset, args.out, names, seed=args.seed)
    print(f"{len(names)} corruptions x 5 severities of {len(dataset)} {args.data} {args.split} images "
          f"in {time.perf_counter() - start:.1f} s: {len(files)} files in {args.out}")
    return 0


def _deck_build(args) -> int:
    from cardkit.engine.deck import build_deck, load_deck_config

    folder = build_deck(load_deck_config(args.config))
    print(f"deck written to {folder}; evaluate it with `cardkit deck evaluate --deck {folder}`")
    return 0


def _deck_evaluate(args) -> int:
    from cardkit.engine.deck import evaluate_deck

    report = evaluate_deck(args.deck, gating=args.gating, k=args.k, distance=args.distance,
                           names=args.corruptions, severities=args.severities, samples=args.samples,
                           suite=args.suite, seed=args.seed, device=args.device)
    header = ["model", "clean acc", "mean corruption acc", "worst corruption", "seconds"]
    rows = []
    for label, result in report["results"].items():
        worst = min(result["accuracy"], key=lambda n: sum(result["accuracy"][n]))
        rows.append([label, f"{result['clean_accuracy']:.4f}", f"{result['mean_accuracy']:.4f}",
                     f"{worst} {sum(result['accuracy'][worst]) / len(result['severities']):.4f}",
                     f"{result['seconds']:.1f}"])
    print(format_table(header, rows))
    memory = report["memory"]
    print(f"deck ({report['gating']} gating, k={report['k']}): {memory['cards']} cards, "
          f"{memory['deck_bytes']:,} bytes; one dense model: {memory['dense_model_bytes']:,} bytes")
    print(f"outputs: {args.deck}/evaluate/metrics.json")
    return 0


def _fourier(args) -> int:
    from cardkit.engine import fourier_checkpoint

    folder, result = fourier_checkpoint(args.checkpoint, eps=args.eps, samples=args.samples,
                                        seed=args.seed, overrides=args.overrides)
    print(f"clean error {result.clean_error:.4f}; error under Fourier noise of L2 norm {result.eps:g}: "
          f"mean {sum(map(sum, result.error)) / sum(map(len, result.error)):.4f}, "
          f"max {max(map(max, result.error)):.4f} ({result.samples} images, {result.seconds:.1f} s)")
    print(f"outputs: {folder}/fourier/heatmap.png, {folder}/fourier/heatmap.json")
    return 0


def _import(args) -> int:
    from cardkit.engine.importer import import_checkpoint
    from cardkit.numbers import parse_number

    sparsity = None
    if args.sparsity is not None:
        try:
            sparsity = float(parse_number(args.sparsity))
        except ValueError:
            raise CardkitError(f"--sparsity given {args.sparsity!r}: not a number; give the fraction of weights "
                               f"removed, e.g. 0.99") from None
    result = import_checkpoint(args.file, model=args.model, dataset=args.data, name=args.name,
                               output_dir=args.output_dir, overrides=args.overrides, layout=args.layout,
                               sparsity=sparsity, normalize=args.normalize, mean=args.mean, std=args.std,
                               check_samples=args.check_samples)
    accuracy = "" if result.clean_accuracy is None else \
        f"; clean accuracy {result.clean_accuracy:.4f} on {result.samples} test images"
    folder = result.run_dir if result.variant == "dense" else result.run_dir / result.variant
    print(f"imported {args.file} ({result.layout} layout, input normalization: {result.normalization}) as "
          f"{result.variant} model {result.checkpoint}{accuracy}")
    print(f"next: cardkit evaluate --checkpoint {folder}")
    return 0


def _size(args) -> int:
    import json

    from cardkit.engine.export import size_checkpoint

    path, report = size_checkpoint(args.checkpoint, "best" if args.best else "last")
    if args.json:
        print(json.dumps({"checkpoint": str(path), **report.to_dict()}, indent=2))
        return 0
    header = ["tensor", "weights", "kept", "scheme", "bits", "values (B)", "positions (B)", "tables (B)", "total (B)"]
    rows = [[t.name, f"{t.weights:,}", f"{t.kept:,}", t.scheme, str(t.value_bits), f"{t.values / 8:,.0f}",
             f"{t.positions / 8:,.0f} {t.position_format}", f"{t.tables / 8:,.0f}", f"{t.bits / 8:,.0f}"]
            for t in report.tensors]
    print(format_table(header, rows))
    print(f"other parameters (float32): {report.other_bits / 8:,.0f} bytes")
    print(f"total: {report.bytes:,} bytes; dense fp32: {report.dense_bits // 8:,} bytes; "
          f"compression {report.compression_ratio:.1f}x ({path})")
    return 0


def _export(args) -> int:
    from cardkit.engine.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, args.format, "best" if args.best else "last",
                               overwrite=args.force)
    print(f"wrote {result['out']}: {result['bytes']:,} bytes ({result['format']}); accounted size "
          f"{result['accounted_bytes']:,} bytes; dense fp32 {result['dense_bytes']:,} bytes "
          f"({result['compression_ratio']:.1f}x); loaded back, outputs differ by at most "
          f"{result['max_abs_difference']:.3g}")
    return 0


def _report(args) -> int:
    from cardkit.engine import read_results

    rows = [_result_row(r["run"], r["dataset"], r.get("variant", "dense"), r["model"], r["robustness"],
                        r.get("verified", []), r.get("corruption")) + [r.get("recorded_at", "-")]
            for r in read_results(args.runs)]
    print(format_table(RESULT_HEADER + ["evaluated (UTC)"], rows, markdown=args.markdown))
    return 0


RESULT_HEADER = ["run", "data", "model", "variant", "sparsity", "split", "samples", "clean acc",
                 "robust acc", "attack", "robust acc after each attack", "verified acc", "corruption acc", "kept params", "size (bytes)",
                 "compression"]


def _result_row(run: str, dataset: str, variant: str, model: dict, ev: dict,
                verified: list[dict] = (), corruption: dict | None = None) -> list[str]:
    from cardkit.eval import RobustnessResult

    result = RobustnessResult.from_dict(ev)
    robust = "-" if result.robust_accuracy is None else f"{result.robust_accuracy:.4f}"
    attack = "-" if result.robust_accuracy is None else result.attack
    stages = " > ".join(f"{s.attack} {s.robust_accuracy:.4f}" for s in result.stages) if len(result.stages) > 1 else "-"
    return [run, dataset, model["name"], variant, f"{model.get('sparsity', 0.0):.4f}", result.split,
            str(result.samples), f"{result.clean_accuracy:.4f}", robust, attack, stages,
            ", ".join(f"{v['method']} {v['verified_accuracy']:.4f}" for v in verified) or "-",
            _corruption_cell(corruption),
            f"{model.get('kept_parameters', model['parameters']):,}", f"{model['size_bytes']:,}",
            f"{model['compression_ratio']:.1f}x" if "compression_ratio" in model else "-"]


def _corruption_cell(summary: dict | None) -> str:
    """Mean accuracy over the corruptions and severities evaluated, and mCE against a baseline."""
    if not summary:
        return "-"
    mce = f", mCE {summary['mce']:.3f}" if summary.get("mce") is not None else ""
    return f"{summary['mean_accuracy']:.4f} ({summary['corruptions']}x{len(summary['severities'])}{mce})"


def _print_result(result) -> None:
    from cardkit.engine.pipeline import corruption_summary

    for stage, rows in result.history.items():
        if rows:
            last = rows[-1]
            accuracy = {k: v for k, v in last.items() if k.endswith("accuracy") and v is not None}
            print(f"{stage}: {last['epoch']} epochs, " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    rows = [_result_row(result.run_dir.name, result.dataset, e.variant, e.model, e.robustness.to_dict(),
                        [v.to_dict() for v in e.verified], corruption_summary(e.corruption))
            for e in result.evaluations]
    if rows:
        print(format_table(RESULT_HEADER, rows))
    print(f"outputs: {result.run_dir}")


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    if markdown:
        fmt = lambda cells: "| " + " | ".join(f"{str(c):<{w}}" for c, w in zip(cells, widths)) + " |"  # noqa: E731
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        fmt = lambda cells: "  ".join(f"{str(c):<{w}}" for c, w in zip(cells, widths))  # noqa: E731
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule] + [fmt(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
