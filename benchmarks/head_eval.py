"""The head's figures in docs/head.md, on one embedding of the data (int8 model, LiteRT).

  python benchmarks/head_eval.py [--cache DIR] [--trials 40]

Prints markdown tables: head vs plain L2 nearest centroid at 1/3/5/10 shots with 2, 3 and all
classes (also with bursts of 5 frames per shot); the unknown gate (known accuracy, unrelated
photos, held-out classes, AUROC; also by kit size over 300 draws); a taught "nothing" class; one view
per class with and without a scene shared by every picture; how often the answer is not the
class with the page's longest bar.
Unknown photos are the odd half of calibration/imagenet-sample, the reference mean is rebuilt
from the even half plus the registry photos (so it never saw the unknowns), and so is the spread
prior (`edge reference`'s augmented views of the same photos). --cache keeps the embeddings (per model hash) outside the repo so a
rerun only redraws trials. --no-spread: the head without the spread prior.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import edge  # noqa: E402,F401  first: numpy then starts one BLAS thread, as in the box (edge/__init__.py)
import numpy as np  # noqa: E402
from edge.engine import DEFAULT_MODEL, Embedder  # noqa: E402
from edge.evaluate import (Split, class_folders, draw_kits, embed_bursts, embed_files, embed_reference,  # noqa: E402
                           reference_of, run_trials)
from edge.head import Head  # noqa: E402
from edge.image import IMAGE_SUFFIXES  # noqa: E402

BURST = 5


def reference_files(root: Path) -> tuple:
    """(photos the reference mean is built from, photos shown as unrelated): the even half of
    calibration/imagenet-sample plus the registry photos, and its odd half."""
    photos = sorted(p for p in (root / "calibration" / "imagenet-sample").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    registry = sorted(p for p in (root / "calibration" / "registry-photos").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return photos[0::2] + registry, photos[1::2]


def embeddings(root: Path, cache: Path | None) -> dict:
    engine = Embedder(DEFAULT_MODEL, threads=None)
    path = cache / f"head_eval_v2_{engine.model_id[:16]}.npz" if cache else None   # v2: with the spread prior
    if path and path.exists():
        return dict(np.load(path))
    out = {}
    for split in ("train", "test"):
        for c, files in class_folders(root / "clothing-small" / split).items():
            out[f"{split}/{c}"] = embed_files(files, engine.embed)
            if split == "train":
                out[f"burst/{c}"] = embed_bursts(files, engine.embed, BURST)
    base_files, unknown_files = reference_files(root)
    out["mean"], out["spread"] = reference_of(*embed_reference(base_files, engine.embed))   # as `edge reference`
    out["unknown"] = embed_files(unknown_files, engine.embed)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--no-spread", action="store_true", help="the head without the spread prior")
    args = ap.parse_args()
    root = Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))
    e = embeddings(root, args.cache)
    names = sorted(k.split("/")[1] for k in e if k.startswith("train/"))
    train = Split({c: e[f"train/{c}"] for c in names})
    bursts = Split({c: e[f"burst/{c}"][:, 0] for c in names}, {c: e[f"burst/{c}"] for c in names})
    test = Split({c: e[f"test/{c}"] for c in names})
    mean, unknown = e["mean"], e["unknown"]
    spread = None if args.no_spread else e["spread"]
    head = lambda: Head(mean=mean, spread=spread)
    run = lambda split=train, **kw: run_trials(split, test, head_factory=head, **{"trials": args.trials, **kw})

    for label, split in (("single photos", train), (f"bursts of {BURST} frames per shot", bursts)):
        print(f"\nClosed-set accuracy, head vs plain L2 nearest centroid ({label}), {args.trials} trials:\n")
        print("| shots | 2 classes | 3 classes | 10 classes |\n| --- | --- | --- | --- |")
        for shots in (1, 3, 5, 10):
            cells = []
            for n in (2, 3, 0):
                r = run(split, shots=shots, classes=n)
                gain = 100 * (r["accuracy"] - r["baseline_accuracy"])
                cells.append(f"{r['accuracy']:.3f} vs {r['baseline_accuracy']:.3f} ({gain:+.1f})")
            print(f"| {shots} | " + " | ".join(cells) + " |")

    print(f"\nUnknown gate (threshold auto), 10 shots, {args.trials} trials:\n")
    print("| taught / held out | closed accuracy | known accuracy, gate on | unrelated photos unknown "
          "| held-out photos unknown | AUROC known vs held-out |\n| --- | --- | --- | --- | --- | --- |")
    for n, held, split, shots in ((0, 0, train, 10), (0, 2, train, 10), (0, 5, train, 10), (3, 2, train, 10),
                                  (3, 7, train, 10), (2, 0, train, 10), (2, 2, train, 10),
                                  (3, 2, bursts, 10), (3, 2, bursts, 3), (3, 2, bursts, 1), (3, 2, train, 1),
                                  (3, 2, train, 3), (2, 2, train, 3),
                                  (0, 2, bursts, 10)):
        r = run(split, shots=shots, classes=n, holdout=held, unknown=unknown)
        kit = f", {shots} shot{'s' if shots > 1 else ''}" if shots != 10 else ""
        kit += f", bursts of {BURST}" if split is bursts else ""
        print(f"| {r['taught_classes']} / {held}{kit} | {r['accuracy']:.3f} | {r['known_accuracy']:.3f} "
              f"({100 * (r['known_accuracy'] - r['accuracy']):+.1f}) | {r['unknown_rate']:.3f} | "
              f"{r.get('holdout_unknown_rate', float('nan')):.3f} | {r.get('holdout_auroc', float('nan')):.3f} |")

    print("\nWhat the gate costs by kit size, 10 shots, seeds 0-2 x 100 trials (one seed of 40 trials of 2 classes "
          "moves by half a point):\n")
    print("| taught / held out | known accuracy lost, seeds 0 / 1 / 2 | held-out unknown | unrelated unknown |\n"
          "| --- | --- | --- | --- |")
    for n, held in ((2, 0), (2, 2), (3, 2), (0, 5), (0, 2), (0, 0)):
        rows = [run(shots=10, classes=n, holdout=held, unknown=unknown, seed=s, trials=100) for s in range(3)]
        lost = " / ".join(f"{100 * (r['accuracy'] - r['known_accuracy']):.1f}" for r in rows)
        caught = np.mean([r.get("holdout_unknown_rate", np.nan) for r in rows])
        print(f"| {rows[0]['taught_classes']} / {held} | {lost} | {caught:.3f} | {np.mean([r['unknown_rate'] for r in rows]):.3f} |")

    print("\nTrade-off curve, 3 taught / 2 held out, 10 shots (threshold moved by the offset):\n")
    print("| offset | known accuracy | unrelated unknown | held-out unknown |\n| --- | --- | --- | --- |")
    for p in run(shots=10, classes=3, holdout=2, unknown=unknown)["curve"]:
        print(f"| {p['offset']:+.2f} | {p['known_accuracy']:.3f} | {p['unknown_rate']:.3f} | {p['holdout_unknown_rate']:.3f} |")

    print("\nClass imbalance (shirt next to t-shirt, 10 photos each; shirt's 10 photos repeated as 200 "
          "near-duplicate frames): t-shirt test photos recognised\n")
    print("| head | 10 vs 10 | 200 vs 10 |\n| --- | --- | --- |")
    rng = np.random.default_rng(0)
    frames = np.repeat(train.classes["shirt"][:10], 20, axis=0)
    frames = frames * rng.uniform(0.97, 1.03, frames.shape).astype(np.float32)
    for kind in ("centroid", "knn"):
        cells = []
        for big in (train.classes["shirt"][:10], frames):
            h = Head(kind, mean=mean, spread=spread)
            h.set_samples({"shirt": big, "t-shirt": train.classes["t-shirt"][:10]})
            cells.append(f"{(h.predict_closed(test.classes['t-shirt']) == 1).mean():.3f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")

    print(f"\nA taught 'nothing' class (20 of the {len(unknown)} unrelated photos), 10 shots:\n")
    print("| taught / held out | unrelated unknown without / with it | known accuracy without / with it "
          "| held-out unknown without / with it |\n| --- | --- | --- | --- |")
    for n, held in ((3, 2), (0, 2)):
        r = run(shots=10, classes=n, holdout=held, unknown=unknown, nothing=unknown, nothing_shots=20)
        print(f"| {r['taught_classes']} / {held} | {r['unknown_rate']:.3f} / {r['nothing_unknown_rate']:.3f} | "
              f"{r['known_accuracy']:.3f} / {r['nothing_known_accuracy']:.3f} | "
              f"{r['holdout_unknown_rate']:.3f} / {r['nothing_holdout_unknown_rate']:.3f} |")

    scenes = np.linspace(0, len(unknown) - 1, 3).astype(int)
    print(f"\nA scene shared by every picture (a camera fixed over one table): each of {len(scenes)} unrelated photos "
          f"in turn added at half weight to every embedding, the others shown as unrelated, {args.trials} trials "
          "each; known accuracy lost / unrelated unknown / held-out unknown\n")
    print("| kit | no scene | shared scene |\n| --- | --- | --- |")
    for n, held, split, shots in ((3, 2, train, 1), (3, 2, bursts, 1), (2, 2, train, 1), (0, 0, train, 1),
                                  (3, 2, train, 3), (3, 2, train, 10)):
        cells = []
        for group in ([None], scenes):
            rows = []
            for sc in group:
                mix = (lambda x: x) if sc is None else (lambda x, s=unknown[sc]: x + np.float32(0.5) * s)
                part = Split({c: mix(v) for c, v in split.classes.items()},
                             None if split.bursts is None else {c: mix(v) for c, v in split.bursts.items()})
                r = run_trials(part, Split({c: mix(v) for c, v in test.classes.items()}), shots, args.trials,
                               head_factory=head, unknown=mix(np.delete(unknown, [] if sc is None else [sc], axis=0)),
                               holdout=held, classes=n)
                rows.append((100 * (r["accuracy"] - r["known_accuracy"]), r["unknown_rate"],
                             r.get("holdout_unknown_rate", np.nan)))
            lost, unrelated, held_out = np.mean(rows, axis=0)
            cells.append(f"{lost:.1f} / {unrelated:.3f}" + ("" if np.isnan(held_out) else f" / {held_out:.3f}"))
        kit = f"{n or 10} / {held}, {shots} shot{'s' if shots > 1 else ''}" + (f", bursts of {BURST}" if split is bursts else "")
        print(f"| {kit} | " + " | ".join(cells) + " |")

    print(f"\nThe page's bars (gate scores) and its answer (the choice), single photos, {args.trials} trials: test "
          "photos whose answer is not the class with the longest bar; accuracy by the answer / by the longest bar\n")
    print("| shots | 3 classes | 10 classes |\n| --- | --- | --- |")
    for shots in (3, 10):
        cells = []
        for n in (3, 0):
            off, by_choice, by_bar, total = 0, 0, 0, 0
            for _, taught, q, truth, _ in draw_kits(train, test, shots, args.trials, classes=n):
                h = head()
                h.set_samples(taught)
                choice, gate = h.evaluate(q)
                off += int(np.sum(choice.argmax(axis=1) != gate.argmax(axis=1)))
                by_choice += int(np.sum(choice.argmax(axis=1) == truth))
                by_bar += int(np.sum(gate.argmax(axis=1) == truth))
                total += len(truth)
            cells.append(f"{off / total:.3f} ({by_choice / total:.3f} / {by_bar / total:.3f})")
        print(f"| {shots} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
