"""The `edge` command: run the box, embed images, evaluate a dataset, benchmark the engine."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

log = logging.getLogger("edge")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """A problem the user can fix; printed as one line, never a traceback."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's way of reporting a problem the user can fix: one line, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(lowest: int):
    """argparse type: a whole number of at least `lowest` (refused at parse time, before any
    model or photo is loaded)."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value
    return whole_number


def _threshold(text: str):
    """argparse type for --threshold: the box's own rule (rules.threshold)."""
    from edge.rules import RuleError, threshold
    try:
        return threshold(text)
    except RuleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a .tflite image model (default: the int8 MobileNetV2 224)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="interpreter threads (default: all cores)")
    p.add_argument("--kernels", choices=("auto", "builtin", "reference"), default="auto",
                   help="LiteRT kernel set; 'reference' for emulators")


def _embedder(args):
    from edge.engine import DEFAULT_MODEL, Embedder
    return Embedder(args.model or DEFAULT_MODEL, threads=args.threads, kernels=args.kernels)


def cmd_embed(args) -> int:
    from edge.image import ImageError, load_image
    engine = _embedder(args)
    failed = 0
    for name in args.images:
        try:
            vec = engine.embed(load_image(name))
        except ImageError as exc:  # one bad image must not stop the others
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.npy:
            out = Path(name).with_suffix(".npy") if args.npy == "-" else Path(args.npy) / (Path(name).stem + ".npy")
            np.save(out, vec)
            print(f"{name}: wrote {out}")
        else:
            norm = float(np.linalg.norm(vec))
            top = np.argsort(vec)[::-1][:3]
            print(f"{name}: dim={vec.size} norm={norm:.3f} mean={vec.mean():.4f} "
                  f"max={vec.max():.3f} top={','.join(str(int(i)) for i in top)}")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_eval(args) -> int:
    from edge.engine import load_reference, load_spread, spread_beside
    from edge.evaluate import load_dataset, load_unknown, run_trials
    from edge.head import Head
    if args.reference and not Path(args.reference).is_file():      # before the model loads
        raise UserError(f"{args.reference}: no such file")
    engine = _embedder(args)
    if args.reference:      # checked like the model's own: a bad file is one line, not a traceback
        mean = load_reference(engine.path, engine.dim, Path(args.reference))
        spread = load_spread(engine.path, engine.dim, spread_beside(args.reference))
    else:
        mean, spread = load_reference(engine.path, engine.dim), load_spread(engine.path, engine.dim)
    train, test = load_dataset(Path(args.dataset), engine.embed, burst=args.burst)
    unknown = load_unknown(Path(args.unknown), engine.embed) if args.unknown else None
    nothing = load_unknown(Path(args.nothing), engine.embed) if args.nothing else None
    result = run_trials(train, test, shots=args.shots, trials=args.trials, seed=args.seed,
                        head_factory=lambda: Head(args.head, k=args.k, mean=mean, threshold=args.threshold, spread=spread),
                        unknown=unknown, holdout=args.holdout_classes, classes=args.classes,
                        nothing=nothing, nothing_shots=args.nothing_shots)
    result.update(model=str(engine.path), head=args.head, threshold=args.threshold)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    print(f"{result['taught_classes']} of {result['classes']} classes, {args.shots} shots"
          f"{f' (bursts of {args.burst})' if args.burst > 1 else ''}, {args.trials} trials, "
          f"head {args.head}: accuracy {result['accuracy']:.3f} ± {result['accuracy_std']:.3f} "
          f"(plain nearest centroid {result['baseline_accuracy']:.3f})")
    print(f"with the unknown gate (threshold {args.threshold}): known accuracy "
          f"{result['known_accuracy']:.3f}")
    for key, text in (("unknown_rate", "unrelated photos called unknown"),
                      ("holdout_unknown_rate", "held-out class photos called unknown"),
                      ("holdout_auroc", "AUROC known vs held-out class photos"),
                      ("nothing_unknown_rate", "with a taught nothing class: other unrelated photos called unknown"),
                      ("nothing_known_accuracy", "with a taught nothing class: known accuracy")):
        if key in result:
            print(f"{text}: {result[key]:.3f}")
    print("threshold offset: known accuracy / unrelated unknown / held-out unknown")
    for point in result["curve"]:
        print(f"  {point['offset']:+.2f}: {point['known_accuracy']:.3f} / "
              f"{point.get('unknown_rate', float('nan')):.3f} / {point.get('holdout_unknown_rate', float('nan')):.3f}")
    for name, acc in result["per_class"].items():
        print(f"  {name:<20} {acc:.3f}")
    return EXIT_OK


def cmd_reference(args) -> int:
    """Write the model's reference mean embedding and spread prior from a broad set of everyday
    photos."""
    from edge.engine import DEFAULT_MODEL, MODELS_DIR, reference_path, spread_beside
    from edge.evaluate import embed_reference, reference_of
    from edge.image import IMAGE_SUFFIXES
    files = []
    for folder in args.folders:
        files += sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 50:
        raise UserError(f"found {len(files)} photos; a reference mean needs at least 50 varied photos")
    beside = reference_path(Path(args.model or DEFAULT_MODEL))
    if args.out:
        out = Path(args.out)
    else:
        # Never into models/ unless asked: the shipped model's reference mean is part of the box.
        out = Path.cwd() / beside.name
        for path in (out, spread_beside(out)):
            if _inside(path, MODELS_DIR) or path.exists():
                raise UserError(f"{path} {'is in models/' if _inside(path, MODELS_DIR) else 'exists already'}; "
                                f"choose where to write with --out FILE")
    engine = _embedder(args)        # after the checks: a refusal costs no model load
    mean, spread = reference_of(*embed_reference(files, engine.embed))
    np.save(out, mean)
    np.save(spread_beside(out), spread.astype(np.float16))     # a prior: 3 digits are plenty
    print(f"wrote {out} and {spread_beside(out)} from {len(files)} photos")
    if out.resolve() != beside.resolve():
        print(f"the box uses the reference mean and spread prior beside the model: copy them to "
              f"{beside} and {spread_beside(beside)} to use them")
    return EXIT_OK


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def cmd_bench(args) -> int:
    from edge.bench import run_bench
    result = run_bench(model=args.model, threads=args.threads, runs=args.runs)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:<40} {value}")
    return EXIT_OK


SYSTEM_CONFIG = Path("/etc/edge/config.yaml")


def config_path(explicit: Optional[str] = None) -> Optional[Path]:
    """--config, else $EDGE_CONFIG, else the installed box's /etc/edge/config.yaml, else this
    checkout's config.yaml (so `edge export` on a Pi talks about the same store as the service)."""
    import os
    from edge.config import DEFAULT_CONFIG_PATH
    for candidate in (explicit, os.environ.get("EDGE_CONFIG")):
        if candidate:
            return Path(candidate)
    for candidate in (SYSTEM_CONFIG, DEFAULT_CONFIG_PATH):
        if candidate.exists():
            return candidate
    return None


def _config(args, secrets: bool = True):
    from edge.config import load_config
    return load_config(config_path(getattr(args, "config", None)), secrets=secrets)


def cmd_run(args) -> int:
    from edge.app import serve
    cfg = _config(args)
    simulate = True if args.simulate else None
    return serve(cfg, simulate=simulate, terminal=not args.no_keys)


def cmd_check_config(args) -> int:
    cfg = _config(args)
    print(f"{cfg.source}: ok ({len(cfg.classes)} classes: {', '.join(c.name for c in cfg.classes)}; "
          f"model {cfg.model.model_path.name}; store {cfg.store.path})")
    return EXIT_OK


def _open_store(args):
    """The configured store, opened for one CLI command (the daemon must not hold it)."""
    from edge.engine import Embedder
    from edge.store import Store, StoreError
    cfg = _config(args, secrets=False)
    engine = Embedder(cfg.model.model_path, threads=1)
    store = Store(cfg.store.path, engine.model_id, engine.dim, max_per_class=cfg.capture.max_per_class,
                  thumbnails=cfg.store.thumbnails)
    try:
        store.open()
    except StoreError as exc:
        if "in use" in str(exc) or "locked" in str(exc):
            raise StoreError(f"{exc} (is the box running? stop it first: sudo systemctl stop edge)") from None
        raise
    if store.read_only:
        store.close()
        raise StoreError(f"store {cfg.store.path} is read-only here (run as the box's user: sudo -u edge ...)")
    return cfg, store


def cmd_export(args) -> int:
    from edge import transfer
    cfg, store = _open_store(args)
    try:
        transfer.export(store, Path(args.file), thumbnails=args.thumbnails)
        infos = store.classes()
    finally:
        store.close()
    print(f"exported {sum(c.count for c in infos)} samples in {sum(1 for c in infos if c.count)} classes "
          f"to {args.file}")
    return EXIT_OK


def cmd_import(args) -> int:
    from edge.app import import_file
    cfg, store = _open_store(args)
    try:
        note = import_file(store, cfg, Path(args.file))
    finally:
        store.close()
    print(f"{note} from {args.file}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the box (simulated pins and keys when no GPIO is found)")
    p.add_argument("--config", help="config file (default: config.yaml of this checkout)")
    p.add_argument("--simulate", action="store_true", help="mock pins even on a Pi")
    p.add_argument("--no-keys", action="store_true", help="no terminal keys/LED line in simulation")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit (2 when invalid)")
    p.add_argument("config", nargs="?", metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("export", help="write what the box learned to one file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--thumbnails", action="store_true", help="include the samples' small pictures")
    p.add_argument("--config")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="replace what the box learned with an exported file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--config")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("embed", help="print the embedding summary of images (or save .npy)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--npy", metavar="DIR", help="write DIR/<name>.npy per image ('-' = beside the image)")
    _add_model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("eval", help="few-shot accuracy of the head on a folder of class folders")
    p.add_argument("dataset", metavar="DATASET")
    p.add_argument("--shots", type=_at_least(1), default=10, help="training images per class (default 10)")
    p.add_argument("--trials", type=_at_least(1), default=20, help="seeded random draws (default 20)")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--head", choices=("centroid", "knn"), default="centroid")
    p.add_argument("--k", type=_at_least(1), default=3, help="neighbours for the knn head")
    p.add_argument("--unknown", metavar="DIR", help="photos of none of the classes: reports unknown_rate")
    p.add_argument("--holdout-classes", type=_at_least(0), default=0, metavar="M",
                   help="never train M classes per trial: reports holdout_unknown_rate")
    p.add_argument("--classes", type=_at_least(0), default=0, metavar="N",
                   help="teach N random classes per trial, like an N-button kit (default all)")
    p.add_argument("--burst", type=_at_least(1), default=1, metavar="F",
                   help="each shot is a burst of F near-duplicate frames (crops of one photo)")
    p.add_argument("--nothing", metavar="DIR",
                   help="unrelated photos: some taught as a 'nothing' class, reports nothing_unknown_rate for the rest")
    p.add_argument("--nothing-shots", type=_at_least(1), default=20, metavar="N",
                   help="photos of --nothing taught per trial (default 20)")
    p.add_argument("--threshold", type=_threshold, default="auto", help="unknown gate: 'auto' or a number from -1 to 1 (default auto)")
    p.add_argument("--reference", metavar="NPY", help="reference mean to use instead of the model's own")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reference", help="compute a model's reference mean embedding and spread prior from photos")
    p.add_argument("folders", nargs="+", metavar="DIR", help="folders of varied everyday photos")
    p.add_argument("--out", help="output .npy (default: <model stem>.mean.npy in the current folder; "
                                 "never into models/ unless given here); the spread prior goes beside "
                                 "it as <name>.spread.npy")
    _add_model_args(p)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("bench", help="measure engine speed and memory as ratios")
    p.add_argument("--runs", type=_at_least(1), default=200, help="timed invokes per measurement")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", help="the int8 model to measure (default: the default model)")
    p.add_argument("--threads", type=_at_least(1), default=None)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from edge.camera import CameraError
    from edge.config import ConfigError
    from edge.engine import ModelError
    from edge.evaluate import DatasetError
    from edge.image import ImageError
    from edge.rules import RuleError
    from edge.store import StoreError
    try:
        return args.func(args)
    except UserError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        for line in exc.errors:         # every bad setting, one line each, in file order
            print(f"edge: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelError, DatasetError, ImageError, StoreError, CameraError, RuleError) as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
