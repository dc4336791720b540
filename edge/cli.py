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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a .tflite image model (default: the int8 MobileNetV2 224)")
    p.add_argument("--threads", type=int, default=None, help="interpreter threads (default: all cores)")
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
    from edge.evaluate import load_dataset, run_trials
    from edge.head import Head
    engine = _embedder(args)
    train, test = load_dataset(Path(args.dataset), engine.embed)
    result = run_trials(train, test, shots=args.shots, trials=args.trials, seed=args.seed,
                        head_factory=lambda: Head(args.head, k=args.k))
    result.update(model=str(engine.path), head=args.head)
    if args.json:
        print(json.dumps(result, indent=None, sort_keys=True))
    else:
        print(f"{result['classes']} classes, {args.shots} shots, {args.trials} trials, "
              f"head {args.head}: accuracy {result['accuracy']:.3f} ± {result['accuracy_std']:.3f}")
        for name, acc in result["per_class"].items():
            print(f"  {name:<20} {acc:.3f}")
    return EXIT_OK


def cmd_bench(args) -> int:
    from edge.bench import run_bench
    result = run_bench(model=args.model, threads=args.threads, runs=args.runs)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:<40} {value}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("embed", help="print the embedding summary of images (or save .npy)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--npy", metavar="DIR", help="write DIR/<name>.npy per image ('-' = beside the image)")
    _add_model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("eval", help="few-shot accuracy of the head on a folder of class folders")
    p.add_argument("dataset", metavar="DATASET")
    p.add_argument("--shots", type=int, default=10, help="training images per class (default 10)")
    p.add_argument("--trials", type=int, default=20, help="seeded random draws (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", choices=("centroid", "knn"), default="centroid")
    p.add_argument("--k", type=int, default=3, help="neighbours for the knn head")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measure engine speed and memory as ratios")
    p.add_argument("--runs", type=int, default=200, help="timed invokes per measurement")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", help="the int8 model to measure (default: the default model)")
    p.add_argument("--threads", type=int, default=None)
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
    from edge.engine import ModelError
    from edge.evaluate import DatasetError
    from edge.image import ImageError
    try:
        return args.func(args)
    except UserError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return exc.code
    except (ModelError, DatasetError, ImageError) as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
