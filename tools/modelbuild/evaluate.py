"""Fidelity and speed of .tflite feature extractors, run with LiteRT as the Pi runs them."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def interpreter(model: bytes | str, threads: int = 2):
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, (bytes, bytearray)):
        interp = Interpreter(model_content=bytes(model), num_threads=threads)
    else:
        interp = Interpreter(model_path=str(model), num_threads=threads)
    interp.allocate_tensors()
    return interp


def embed_all(model: bytes | str, images: np.ndarray, threads: int = 2) -> np.ndarray:
    """(N, D) float32 features of (N, S, S, 3) prepared uint8 images, through the runtime's own
    edge.engine.Embedder (input handling and output dequantization exactly as on the Pi)."""
    from edge.engine import Embedder  # data.py put the repo on sys.path

    with tempfile.TemporaryDirectory() as tmp:
        path = model
        if isinstance(model, (bytes, bytearray)):
            path = os.path.join(tmp, "model.tflite")
            with open(path, "wb") as f:
                f.write(model)
        embedder = Embedder(path, threads=threads)
        if embedder.size != images.shape[1]:
            raise ValueError(f"model takes {embedder.size} px, images are {images.shape[1]} px")
        return np.stack([embedder.invoke(img) for img in images])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def top1(features: np.ndarray, labels: list[int], w: np.ndarray, b: np.ndarray) -> float:
    logits = features @ w.T + b
    return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)))


def few_shot(train: np.ndarray, train_labels: list[int], test: np.ndarray, test_labels: list[int],
             shots: int = 10, draws: int = 20, seed: int = 0) -> float:
    """Mean accuracy of nearest-centroid (cosine, L2-normalized embeddings) over seeded draws of
    `shots` training images per class. Same draws for every model given the same seed."""
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # noqa: E731
    train, test = unit(train), unit(test)
    classes = np.unique(train_labels)
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(draws):
        centroids = []
        for c in classes:
            pick = rng.choice(np.flatnonzero(train_labels == c), shots, replace=False)
            centroids.append(train[pick].mean(axis=0))
        centroids = unit(np.stack(centroids))
        pred = classes[np.argmax(test @ centroids.T, axis=1)]
        accs.append(np.mean(pred == test_labels))
    return float(np.mean(accs))


def invoke_times(models: dict[str, bytes | str], image: np.ndarray | dict, threads: int = 2,
                 rounds: int = 15, per_round: int = 10) -> dict[str, float]:
    """Median invoke() seconds of each model. Rounds interleave the models so that load from
    other processes on the machine hits them alike. `image`: one uint8 input, or one per model."""
    interps = {name: interpreter(m, threads) for name, m in models.items()}
    for name, interp in interps.items():
        img = image[name] if isinstance(image, dict) else image
        interp.set_tensor(interp.get_input_details()[0]["index"], img[None])
        for _ in range(3):
            interp.invoke()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, interp in interps.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                interp.invoke()
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}
