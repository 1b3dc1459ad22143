"""Can one frame tell the class? A small 2D CNN trained on single frames of a synthetic set's training videos (16
evenly spaced ones of each, shuffled), tested on its test videos: on a set whose classes are motions, it should
stay near chance (docs/benchmarks.md, "Hard synthetic set").

    python scripts/single_frame.py data/hard/videos --json single_frame.json

Frames are scaled to 170 x 128 like the shards; training takes random 112 x 112 crops (flipped half the
time), testing the centre crop; test accuracy is per frame and per video (the frames' softmaxes averaged).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import numpy as np
import torch
from torch import nn

SCALED, CROP = (170, 128), 112  # the synthetic 224 x 168 scaled to a short side of 128, as the shards


def frames_of(root: Path, split: str, classes: list[str], per_video: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_video` evenly spaced frames of every video of `split`, scaled to 170 x 128 as the shards are:
    (videos, per_video, 128, 170, 3) uint8, and the labels."""
    videos, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.mp4")):
            raw, _ = (
                ffmpeg.input(str(path))
                .filter("scale", *SCALED)
                .output("pipe:", format="rawvideo", pix_fmt="rgb24")
                .run(cmd=imageio_ffmpeg.get_ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
            )
            frames = np.frombuffer(raw, np.uint8).reshape(-1, SCALED[1], SCALED[0], 3)
            videos.append(frames[np.linspace(0, len(frames) - 1, per_video).round().astype(int)])
            labels.append(label)
    return np.stack(videos), np.array(labels)


def small_cnn(classes: int) -> nn.Module:
    """Four conv-BN-ReLU stages (16 to 128 channels), each halving the frame, then a linear classifier."""
    layers: list[nn.Module] = []
    width = 3
    for planes in (16, 32, 64, 128):
        conv = nn.Conv2d(width, planes, 3, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(planes), nn.ReLU(), nn.MaxPool2d(2)]
        width = planes
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(frames).permute(0, 3, 1, 2).float() - 128.0) / 64.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the synthetic videos: ROOT/classes.txt, ROOT/{train,test}/")
    parser.add_argument("--frames-per-video", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    classes = (args.root / "classes.txt").read_text().split()
    train_videos, train_labels = frames_of(args.root, "train", classes, args.frames_per_video)
    test_videos, test_labels = frames_of(args.root, "test", classes, args.frames_per_video)
    train_frames = train_videos.reshape(-1, *train_videos.shape[2:])
    train_frame_labels = torch.from_numpy(np.repeat(train_labels, args.frames_per_video))
    height, width = train_frames.shape[1:3]

    model = small_cnn(len(classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for epoch in range(args.epochs):
        model.train()
        order, hits = rng.permutation(len(train_frames)), 0
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            top, left = rng.integers(height - CROP + 1), rng.integers(width - CROP + 1)
            crops = train_frames[batch, top : top + CROP, left : left + CROP]
            if rng.random() < 0.5:
                crops = crops[:, :, ::-1]
            logits = model(to_tensor(np.ascontiguousarray(crops)))
            loss = nn.functional.cross_entropy(logits, train_frame_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hits += int((logits.argmax(1) == train_frame_labels[batch]).sum())
        history.append(hits / len(order))
        print(f"epoch {epoch + 1}: train frame top-1 {history[-1]:.1%}", flush=True)

    model.eval()
    top, left = (height - CROP) // 2, (width - CROP) // 2
    with torch.no_grad():
        probs = torch.stack(
            [model(to_tensor(video[:, top : top + CROP, left : left + CROP])).softmax(1) for video in test_videos]
        )  # (videos, frames, classes)
    labels = torch.from_numpy(test_labels)
    result = {
        "root": str(args.root),
        "classes": len(classes),
        "chance": 1 / len(classes),
        "train_frames": len(train_frames),
        "test_videos": len(test_videos),
        "epochs": args.epochs,
        "last_epoch_train_frame_top1": history[-1],
        "test_frame_top1": float((probs.argmax(2) == labels[:, None]).float().mean()),
        "test_video_top1": float((probs.mean(1).argmax(1) == labels).float().mean()),
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
