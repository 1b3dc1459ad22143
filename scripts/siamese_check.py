"""Did an SKD-SRL run's Siamese branch collapse, and how large were its loss terms?

    python scripts/siamese_check.py RUN_DIR [--data DIR] [--videos 64]

SimSiam's check (Chen and He, 2021): the per-dimension standard deviation of the l2-normalised projector outputs
z / |z| over many clips. Collapsed to a constant it is 0; spread over the unit sphere it is about 1/sqrt(d).
Computed on the held-out split's clips (centre windows, as `eval` cuts them) with RUN_DIR/best.pt. Also prints
the loss terms per epoch from RUN_DIR/metrics.jsonl: CE, KL (Eq. 2, before alpha) and Sim (Eq. 4, before beta),
so their scales can be compared with the weights alpha and beta.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from dali_skd.checkpoint import TrainedRun
from dali_skd.methods import SKDSRL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the --out directory of an skd-srl run")
    parser.add_argument("--data", help="dataset directory (default: the run's)")
    parser.add_argument("--videos", type=int, default=64, help="held-out videos to use (2 clips each)")
    args = parser.parse_args()

    run = TrainedRun.load(args.run / "best.pt")
    cfg = run.config
    if cfg.method != "skd-srl":
        raise SystemExit(f"{args.run} trained {cfg.method}: only skd-srl has a Siamese branch")
    method = run.method.eval()
    assert isinstance(method, SKDSRL)
    loader = run.eval_loader(args.data or cfg.data, batch_size=32, clips_per_video=2)
    outputs = []
    with torch.inference_mode():
        for batch in itertools.islice(loader.epoch(), -(-args.videos * 2 // 32)):
            outputs.append(method.projector(method.model.forward_features(batch.clips)))
    z = torch.nn.functional.normalize(torch.cat(outputs), dim=1)
    d = z.shape[1]
    print(f"{len(z)} clips: std of z/|z| per dimension, averaged: {z.std(dim=0).mean():.4f} "
          f"(collapsed: 0; spread over the sphere: 1/sqrt({d}) = {d**-0.5:.4f})")  # fmt: skip
    print(f"alpha {cfg.objective.alpha}, beta {cfg.objective.beta}, tau {cfg.objective.tau}")
    print("epoch   loss_ce  loss_kl  loss_sim")
    for line in (args.run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"{r['epoch']:>5} {r['loss_ce']:>9.4f} {r['loss_kl']:>8.4f} {r['loss_sim']:>9.4f}")


if __name__ == "__main__":
    main()
