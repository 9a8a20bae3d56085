"""The ``medssl`` command line (§8), thin: each subcommand parses arguments, calls the package.

Exit codes:

* 0 — success (for ``validate``: every case is fine and the manifest fits the use asked for);
* 1 — bad input: a manifest or case problem (every :class:`~medssl_kit.errors.MedsslError`),
  an I/O error, or ``validate`` finding problems; each problem is printed on stderr as one line
  ``medssl: error: <message>``, never as a traceback;
* 2 — usage error: unknown command, missing or malformed arguments (argparse's convention);
* 130 — interrupted (Ctrl-C).

A subcommand is a pair of small functions: ``_add_<name>(subparsers)`` declares its arguments and
sets ``handler=_run_<name>``, which takes the parsed arguments and returns the exit code. Register
a new one in ``_SUBCOMMANDS``. Heavy imports (torch, MONAI) happen inside the handlers, so
``medssl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from medssl_kit import __version__
from medssl_kit.config import PROFILES, get_profile
from medssl_kit.errors import MedsslError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(MedsslError):
    """A command-line argument the command cannot use (exit code 2)."""


def _error(message: object) -> None:
    """Print one line ``medssl: error: <message>`` on stderr."""
    print(f"medssl: error: {' '.join(str(message).split())}", file=sys.stderr)


def _report(err: MedsslError) -> None:
    """Print every problem an error stands for, one line each."""
    for problem in getattr(err, "problems", None) or [err]:
        _error(problem)


def _number(cast: type, what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: ``cast(text)`` that must satisfy ``ok``, else "expected <what>"."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: 0 < v < float("inf"))


# --------------------------------------------------------------------------------------------
# phantom


def _add_phantom(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="generate the procedural abdominal CT/MRI phantom and its manifest",
        description="Write NIfTI images and labels of the phantom (§2.1) and DIR/manifest.json. "
        "Defaults for --cases, --shape and the split come from the profile.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--cases", type=_positive_int, metavar="N", help="number of cases")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="random seed")
    p.add_argument(
        "--shape", type=_positive_int, nargs=3, metavar=("D", "H", "W"), help="volume size, voxels"
    )
    p.add_argument(
        "--spacing",
        type=_positive_float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="voxel spacing in mm (default: the generator's, varying between cases)",
    )
    p.add_argument("--modality", choices=("ct", "mri"), default="ct")
    p.add_argument(
        "--sources",
        metavar="A,B,C",
        help="make partially labelled sources (A: liver+lesion, B: kidneys, C: spleen+aorta)",
    )
    p.add_argument(
        "--source-splits",
        metavar="SPLITS",
        help="with --sources: give sources only to the cases of these splits, e.g. pretrain "
        "(a partially labelled pool for MixCL); other splits stay fully labelled "
        "(default: every split)",
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="profile for the defaults (default: $MEDSSL_PROFILE, else cpu)",
    )
    p.add_argument("--workers", type=_positive_int, default=2, metavar="W", help="processes")
    p.set_defaults(handler=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    from medssl_kit.data.phantom import make_phantom

    settings = get_profile(args.profile).phantom
    cases = args.cases if args.cases is not None else settings.cases
    shape = tuple(args.shape) if args.shape is not None else settings.shape
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    extra: dict[str, list[str]] = {}  # only when given: without the flag, the call is unchanged
    if args.source_splits is not None:
        extra["source_splits"] = [s.strip() for s in args.source_splits.split(",") if s.strip()]
    # The profile's split counts apply to its own case count; otherwise the generator scales them.
    split = dict(settings.split) if cases == settings.cases else None
    started = time.perf_counter()
    try:
        manifest = make_phantom(
            args.out,
            cases=cases,
            seed=args.seed,
            shape=shape,
            spacing=None if args.spacing is None else tuple(args.spacing),
            modality=args.modality,
            sources=sources,
            split=split,
            workers=args.workers,
            **extra,
        )
    except ValueError as err:  # the generator rejects arguments it cannot honour
        raise UsageError(str(err)) from err
    elapsed = time.perf_counter() - started
    print(
        f"wrote {cases} phantom cases to {manifest.parent} (manifest {manifest}) in {elapsed:.1f} s"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# validate


def _splits_arg(text: str) -> tuple[str, ...]:
    from medssl_kit.data.manifest import SPLITS

    names = tuple(s.strip() for s in text.split(",") if s.strip() and s.strip() != "none")
    unknown = [s for s in names if s not in SPLITS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}"
        )
    return names


def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    from medssl_kit.data.manifest import USES

    p = subparsers.add_parser(
        "validate",
        help="check a manifest and every case it lists; say what it can be used for",
        description="Read every case of the manifest and check it (§2.6). Prints a summary "
        "table and what the manifest can be used for: 'pre-training only' (cases in the pretrain "
        "or train split) or 'pre-training and fine-tuning' (train and test cases as well). Exits "
        "0 when every case is sound and the manifest is fit for the use asked for (--for; "
        "default: pre-training at least, the splits fine-tuning would need being a note); else "
        "prints each problem on one line and exits 1. Nothing is written.",
    )
    p.add_argument("manifest", metavar="MANIFEST", help="manifest file (or a folder holding one)")
    p.add_argument(
        "--for",
        dest="use",
        choices=USES,
        metavar="USE",
        help="the use the manifest must be fit for: pretrain (a case in the pretrain or train "
        "split) or finetune (also a train and a test case: fine-tuning and evaluation); default: "
        "report the use, succeed when it can at least pre-train",
    )
    p.add_argument(
        "--patch-size",
        type=_positive_int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="also require every volume to be at least this large (z, y, x voxels)",
    )
    p.add_argument(
        "--require-splits",
        type=_splits_arg,
        default=(),
        metavar="S1,S2",
        help="also require these splits to have cases, e.g. pretrain for a pre-training pool "
        "(default: none beyond --for's; 'none' for none)",
    )
    p.set_defaults(handler=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from medssl_kit.data.manifest import load_manifest
    from medssl_kit.data.validate import validate_manifest

    manifest = load_manifest(args.manifest)
    report = validate_manifest(
        manifest, patch_size=args.patch_size, use=args.use, splits_required=args.require_splits
    )
    print(report.summary_table())
    if report.ok:
        return EXIT_OK
    for problem in report.problems:
        _error(problem)
    return EXIT_FAILED


# --------------------------------------------------------------------------------------------
# import-msd


def _add_import_msd(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-msd",
        help="write a manifest for a Medical Segmentation Decathlon task folder",
        description="Convert a Medical Segmentation Decathlon task folder (dataset.json, "
        "imagesTr, labelsTr, imagesTs) into a manifest with a seeded pretrain/train/val/test "
        "split (50/20/10/20 %% of the labelled cases; imagesTs become unlabelled pretrain "
        "cases). The task folder is only read.",
    )
    p.add_argument("task_dir", metavar="TASK_DIR", help="the task folder, e.g. Task02_Heart")
    p.add_argument("--out", required=True, metavar="MANIFEST", help="manifest file to write")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="split seed")
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(-200.0, 300.0),
        metavar=("LO", "HI"),
        help="CT intensity window in HU (default: -200 300)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing MANIFEST")
    p.set_defaults(handler=_run_import_msd)


def _run_import_msd(args: argparse.Namespace) -> int:
    from medssl_kit.data.manifest import SPLITS, load_manifest
    from medssl_kit.data.msd import import_msd

    if args.window[0] >= args.window[1]:
        raise UsageError(f"--window needs LO < HI, got {args.window[0]:g} {args.window[1]:g}")
    path = import_msd(
        args.task_dir,
        args.out,
        seed=args.seed,
        window=tuple(args.window),
        overwrite=args.overwrite,
    )
    manifest = load_manifest(path)
    counts = ", ".join(f"{s} {len(manifest.split(s))}" for s in SPLITS)
    print(f"wrote {path}: {len(manifest.cases)} cases ({counts})")
    return EXIT_OK


# --------------------------------------------------------------------------------------------


def _add_run_arguments(p: argparse.ArgumentParser, set_help: str) -> None:
    """Arguments every training command shares (pretrain, finetune)."""
    p.add_argument("--manifest", required=True, metavar="M", help="manifest file or folder")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: $MEDSSL_PROFILE or cpu")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write")
    p.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        help="default: 2 (pretrain: the method's, e.g. 3D mixcl)",
    )
    p.add_argument("--backbone", metavar="NAME", help="default: unet, or the method's")
    p.add_argument("--steps", type=_positive_int, metavar="N", help="override the profile")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train: auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda",
    )
    p.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (DDP through torchrun's launcher; gloo on "
        "CPU, one GPU each on CUDA); the batch size stays the global batch (default 1)",
    )
    p.add_argument(
        "--set",
        type=_set_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{set_help} (JSON values)",
    )


# --------------------------------------------------------------------------------------------
# pretrain


def _add_pretrain(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pre-training of a backbone with one method",
        description="Pre-train on the images of the manifest's pretrain and train splits (labels "
        "unused) and write the run folder (config.json, metrics.jsonl, checkpoint.pt, "
        "transferable.pt, summary.json) that `medssl finetune --init RUN_DIR` consumes.",
    )
    p.add_argument("--method", required=True, metavar="NAME")
    _add_run_arguments(p, "a loop setting (lr, optimizer, batch_size, ...) or a method setting")
    p.set_defaults(handler=_run_pretrain)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``, or an abbreviation argparse took)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = token.partition("=")
        if len(name) > 2 and "--nproc".startswith(name):
            skip = not eq
            continue
        out.append(token)
    return out


def _launched(args: argparse.Namespace, batch_size: Callable[[], int]) -> bool:
    """With ``--nproc N`` > 1, run this command without ``--nproc`` in N worker processes
    (:func:`medssl_kit.train.distributed.launch`) and return True once they have finished; rank
    0 prints the result. False with one process."""
    if args.nproc == 1:
        return False
    from medssl_kit.train.distributed import check_processes, launch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise UsageError(
            "--nproc starts its own worker processes; under torchrun leave it out (torchrun's "
            "--nproc_per_node sets them)"
        )
    check_processes(batch_size(), args.nproc)
    launch(args.nproc, _without_nproc(args.argv))
    return True


def _run_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from medssl_kit.distributed import env_rank
    from medssl_kit.methods.registry import get_method
    from medssl_kit.train.distributed import reported_to_launcher
    from medssl_kit.train.pretrain import PretrainConfig, run_pretraining

    get_method(args.method)  # fail on an unknown name before anything is read
    cfg = PretrainConfig(
        method=args.method,
        profile=args.profile,
        seed=args.seed,
        dims=args.dims,
        backbone=args.backbone,
        steps=args.steps,
        device=args.device,
    )
    loop = {f.name for f in fields(PretrainConfig)}
    _apply_overrides(cfg, [(k, v) for k, v in args.set if k in loop])
    cfg.method_cfg.update({k: v for k, v in args.set if k not in loop})
    if _launched(args, lambda: cfg.resolved().batch_size):
        return EXIT_OK
    with reported_to_launcher():
        result = run_pretraining(cfg, args.manifest, args.out, resume=args.resume)
    if env_rank() != 0:  # several processes: rank 0 reports
        return EXIT_OK
    s = result.summary
    print(
        f"{s['method']}: {s['steps']} steps, final loss {s['final_loss']:.4g}, "
        f"{s['median_seconds_per_step']:.3f} s/step, {s['wall_time_s']:.1f} s"
    )
    print(f"run folder: {result.run_dir}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# finetune


def _labeled_arg(text: str) -> int | float | str:
    if text == "all":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a case count, a fraction in (0, 1) or 'all', got '{text}'"
        ) from None
    return int(value) if value >= 1 and value == int(value) else value


def _set_arg(text: str) -> tuple[str, object]:
    """``key=value`` with a JSON value (``steps=100``, ``patch_size=[16,64,64]``) or a string."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got '{text}'")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _apply_overrides(cfg: object, pairs: list[tuple[str, object]]) -> None:
    from dataclasses import fields

    names = {f.name for f in fields(cfg)}
    for key, value in pairs:
        if key not in names:
            raise UsageError(
                f"--set {key}: unknown setting; choose from {', '.join(sorted(names))}"
            )
        setattr(cfg, key, tuple(value) if isinstance(value, list) else value)


def _add_finetune(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune (or probe, classify, kNN-label) with a label budget; evaluate on the test "
        "split",
        description="Fine-tune from scratch or from a run folder's transferable weights with "
        "N labelled train cases (or a fraction), validate for early stopping, evaluate every test "
        "volume and write the run folder (config.json, metrics.jsonl, checkpoint.pt, "
        "transferable.pt, results.csv, summary.json).",
    )
    p.add_argument("--init", default="scratch", metavar="scratch|RUN_DIR")
    p.add_argument("--labeled", type=_labeled_arg, default="all", metavar="N|F|all")
    p.add_argument(
        "--mode",
        choices=("full", "probe", "classify", "knn", "linear", "nonlinear"),
        default="full",
        help="linear / nonlinear: the fpn's linear probe / non-linear fine-tuning (--backbone fpn)",
    )
    _add_run_arguments(p, "any FinetuneConfig field, e.g. lr=3e-4")
    p.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from medssl_kit.distributed import env_rank
    from medssl_kit.train.distributed import reported_to_launcher
    from medssl_kit.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        profile=args.profile,
        mode=args.mode,
        labeled=args.labeled,
        seed=args.seed,
        backbone=args.backbone or "unet",
        dims=args.dims or 2,
        steps=args.steps,
        device=args.device,
    )
    _apply_overrides(cfg, args.set)
    if _launched(args, lambda: cfg.resolved().batch_size):
        return EXIT_OK
    with reported_to_launcher():
        result = finetune(args.init, args.manifest, cfg, args.out, resume=args.resume)
    if env_rank() != 0:  # several processes: rank 0 reports
        return EXIT_OK
    if result.key_report is not None:
        print(f"init {args.init}: {result.key_report.summary().splitlines()[0]}")
    shown = {k: v for k, v in result.summary.items() if k != "labeled_cases"}
    print(
        "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    )
    print(f"run folder: {result.run_dir}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# clusters


def _add_clusters(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "clusters",
        help="what a run's frozen pixel features group by: organ, position or intensity",
        description="Cluster the frozen pixel features of --init (as the kNN mode reads them) "
        "over the body pixels of the split's slices with spherical k-means and print the "
        "normalised mutual information of the clusters with the organ label, the pixel's cell "
        "in a grid over the slice and its intensity quantile; --out writes them as JSON.",
    )
    p.add_argument("--init", default="scratch", metavar="scratch|RUN_DIR")
    p.add_argument("--manifest", required=True, metavar="M", help="manifest file or folder")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: $MEDSSL_PROFILE or cpu")
    p.add_argument("--features", choices=("decoder", "encoder"), default="decoder")
    p.add_argument("--backbone", default="unet", metavar="NAME")
    p.add_argument("--split", choices=("pretrain", "train", "val", "test"), default="test")
    p.add_argument("--k", type=_positive_int, default=16, help="clusters (default 16)")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S")
    p.add_argument("--out", metavar="FILE.json", help="also write the result here")
    p.set_defaults(handler=_run_clusters)


def _run_clusters(args: argparse.Namespace) -> int:
    from medssl_kit.train.feature_clusters import ClusterConfig, feature_clusters

    cfg = ClusterConfig(
        profile=args.profile,
        features=args.features,
        backbone=args.backbone,
        split=args.split,
        k=args.k,
        seed=args.seed,
    )
    result = feature_clusters(args.init, args.manifest, cfg, out=args.out)
    nmi, ref = result["nmi"], result["reference"]
    print(
        f"{args.init} ({args.features}, {result['pixels']} pixels of {result['slices']} slices, "
        f"k={args.k}): NMI with organ {nmi['organ']:.3f}, position {nmi['position']:.3f}, "
        f"intensity {nmi['intensity']:.3f}; organ with position {ref['position']:.3f}, "
        f"with intensity {ref['intensity']:.3f}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# export


# The keys of medssl_kit.models.export.EXPORT_TARGETS (a test keeps them equal), spelled out so
# that building the parser does not import torch.
EXPORT_TARGET_NAMES = ("monai-unet", "flexible-unet", "unetr")


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a run's backbone weights for the matching MONAI network",
        description="Load RUN_DIR/transferable.pt, map its weights onto the MONAI network "
        "(BasicUNet for unet, FlexibleUNet for resunet, UNETR for unetr), check that they load "
        "with strict=True, print the key report and write FILE (a state_dict plus the MONAI "
        "network's name and constructor arguments).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", required=True, choices=EXPORT_TARGET_NAMES, dest="target")
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from medssl_kit.train.transfer import export_run

    report, spec = export_run(args.run_dir, args.target, args.out)
    print(f"{spec.qualified_name}: {report.summary()}")
    print(f"wrote {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# report


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="compare fine-tuning results: Dice / HD95 per method and budget, Wilcoxon p; "
        "slice-classifier AUROC",
        description="Read every results.csv under the given folders (or files) and print the "
        "comparison table in Markdown: organ and lesion Dice and organ HD95 as mean ± sd over "
        "seeds, and a paired Wilcoxon signed-rank p of organ Dice against the baseline over "
        "(test case, seed) pairs. Slice-classifier runs (finetune --mode classify) under the "
        "folders get a second table: AUROC mean ± sd over seeds and the paired difference "
        "against the baseline with a 95 %% case-bootstrap interval and p. Runs made at the "
        "smoke profile get a note first: their numbers only show that the pipeline runs.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders or results.csv files")
    p.add_argument("--baseline", default="scratch", metavar="METHOD")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from medssl_kit.atomic import atomic_write_text
    from medssl_kit.evaluate.classification import (
        auroc_markdown,
        auroc_table,
        load_classifier_predictions,
    )
    from medssl_kit.evaluate.report import (
        comparison_table,
        profile_notes,
        split_classes,
        to_markdown,
    )
    from medssl_kit.evaluate.results import RESULTS_FILENAME, load_results

    predictions = load_classifier_predictions(args.paths)
    segmentation = [
        p for p in args.paths if Path(p).is_file() or next(Path(p).rglob(RESULTS_FILENAME), None)
    ]
    if not segmentation and predictions.empty:
        raise MedsslError(
            f"no {RESULTS_FILENAME} and no classifier run found under {', '.join(args.paths)}"
        )
    for note in profile_notes(args.paths):
        print(f"> Note: {note}\n")
    tables = []
    if segmentation:
        df = load_results(segmentation)
        organs, lesions = split_classes(dict(zip(df["class_id"], df["class"], strict=True)))
        table = comparison_table(df, organs, lesions, baseline=args.baseline)
        print(to_markdown(table, baseline=args.baseline))
        tables.append(table)
    if not predictions.empty:
        table = auroc_table(predictions, baseline=args.baseline)
        print(("\n" if tables else "") + auroc_markdown(table, baseline=args.baseline))
        tables.append(table)
    if args.csv:
        atomic_write_text(args.csv, "\n".join(t.to_csv(index=False) for t in tables))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# run


def _comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse type: a comma-separated list, each element parsed by ``item``."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
        return [item(p) for p in parts]

    return parse


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="the pipeline: data, pre-training, fine-tuning and comparison notebooks (papermill)",
        description="Execute the ordered notebooks headlessly with papermill: 00_data_prep, the "
        "pre-training notebook of each method, 20_finetune for scratch and every method over the "
        "label budgets x seeds, and 40_compare (report.html, summary.csv). Each executed notebook "
        "is saved in OUT/notebooks/ and OUT/pipeline.json records stages, parameters, times, "
        "status, versions and the git revision.",
    )
    p.add_argument("--out", required=True, metavar="OUT", help="the run folder, e.g. runs/main")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: $MEDSSL_PROFILE or cpu")
    p.add_argument(
        "--methods",
        type=_comma_list(str),
        metavar="M1,M2",
        help="pre-training methods compared with scratch (default: every registered method)",
    )
    p.add_argument("--manifest", metavar="M", help="default: the profile's phantom")
    p.add_argument(
        "--data-dir", metavar="DIR", help="where the phantom goes (default: data/phantom-PROFILE)"
    )
    p.add_argument(
        "--labeled",
        type=_comma_list(_labeled_arg),
        metavar="1,2,4,all",
        help="label budgets (default: the profile's)",
    )
    p.add_argument(
        "--seeds",
        type=_comma_list(_non_negative_int),
        metavar="0,1,2",
        help="fine-tuning seeds (default: the profile's; smoke 0, cpu and gpu 0,1,2)",
    )
    p.add_argument(
        "--steps", type=_positive_int, metavar="N", help="pre-training steps (default: profile)"
    )
    p.add_argument("--resume", action="store_true", help="skip the completed stages of OUT")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run independent stages (pre-training of different methods, fine-tuning of "
        "different inits) in N worker kernels side by side (default 1)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="T",
        help="CPU threads per kernel (default: with --jobs > 1, the cores shared out; else "
        "$OMP_NUM_THREADS)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="do not echo the notebooks' output (stage progress is still printed)",
    )
    p.set_defaults(handler=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from medssl_kit.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        profile=get_profile(args.profile).name,
        methods=args.methods,
        manifest=args.manifest,
        data_dir=args.data_dir,
        labeled=args.labeled,
        seeds=args.seeds,
        steps=args.steps,
    )
    start = time.perf_counter()

    def progress(line: str) -> None:
        elapsed = time.perf_counter() - start
        print(f"[{elapsed / 60:5.1f} min] {line}", file=sys.stderr, flush=True)

    stages = run_pipeline(
        cfg,
        args.out,
        resume=args.resume,
        log_output=not args.quiet,
        jobs=args.jobs,
        threads=args.threads,
        report=progress,
    )
    for stage in stages:
        print(f"{stage.name:<24} {stage.status:<10} {stage.seconds or 0:8.1f} s  {stage.output}")
    out = Path(args.out)
    summary = out / "summary.csv"
    if summary.is_file():
        import pandas as pd

        from medssl_kit.evaluate.report import profile_notes, to_markdown

        for note in profile_notes(out / "finetune"):
            print(note)
        print(to_markdown(pd.read_csv(summary)))
    elapsed = time.perf_counter() - start
    print(f"pipeline finished in {elapsed:.0f} s; report: {out / 'report.html'}")
    print(f"record: {out / 'pipeline.json'}")
    return EXIT_OK


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_phantom,
    _add_validate,
    _add_import_msd,
    _add_pretrain,
    _add_finetune,
    _add_clusters,
    _add_export,
    _add_report,
    _add_run,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``medssl`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="medssl",
        description="medssl_kit: dense self-supervised pre-training on medical images.",
        epilog="Exit codes: 0 success, 1 bad input or failed validation, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medssl`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # --nproc re-runs the command
    except SystemExit as exit_:  # argparse exits on --help / --version (0) and usage errors (2)
        if exit_.code is None:
            return EXIT_OK
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except UsageError as err:
        _error(err)
        return EXIT_USAGE
    except MedsslError as err:
        _report(err)
        return EXIT_FAILED
    except OSError as err:
        _error(err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
