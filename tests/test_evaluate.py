"""The evaluator's figures against hand-computed ones: a stub model with known logits for every clip, on the real
loader and pipeline, in one process and over two ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clipdata import LookupModel, flat_frames, write_dataset
from conftest import run_two_ranks

from dali_skd.config import ClipConfig, LoaderConfig
from dali_skd.data.loader import EvalLoader
from dali_skd.distributed import init_distributed
from dali_skd.evaluation import EvalResult, evaluate, topk_correct
from dali_skd.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]
LABELS = [0, 1, 2, 1, 1]
STARTS = (0, 4, 8)  # three clips of 4 frames spread over 12
LOGITS = {  # video -> the logits of its three clips
    0: [[10, 0, 0], [0, 3, 0], [0, 3, 0]],  # mean softmax: class 1 (wrong), though the mean logit says 0
    1: [[0, 5, 0]] * 3,
    2: [[0, 0, 1], [0, 0, 1], [2, 0, 0]],  # mean softmax 0.40 0.18 0.42: class 2, right by a little
    3: [[4, 1, 0]] * 3,  # class 0 (wrong), the label second
    4: [[0, 5, 0]] * 3,
}
TABLE = {(video, start): logits for video, rows in LOGITS.items() for start, logits in zip(STARTS, rows, strict=True)}


@pytest.fixture(scope="module")
def flat_data(tmp_path_factory) -> Path:
    videos = [(flat_frames(video, 12), label) for video, label in enumerate(LABELS)]
    return write_dataset(tmp_path_factory.mktemp("flat"), {"test": videos}, CLASSES, per_shard=2)


def eval_loader(data: str | Path, **kw) -> EvalLoader:
    clip, loader = ClipConfig(length=4, crop=32), LoaderConfig(threads=1)
    runtime = kw.pop("runtime", Runtime(torch.device("cpu")))
    return EvalLoader(str(data), "test", clip=clip, loader=loader, runtime=runtime, batch_size=4, **kw)


def softmax(logits: list[list[float]]) -> np.ndarray:
    e = np.exp(np.array(logits, np.float64))
    return e / e.sum(axis=1, keepdims=True)


def check_figures(result: EvalResult) -> None:
    """Hand-computed: videos 1, 2 and 4 are right, video 0 goes to class 1, video 3 to class 0; of the clips,
    1 + 3 + 2 + 0 + 3 are right; with 3 classes every label is among the top 5."""
    assert result.videos == 5 and result.video_top1 == pytest.approx(3 / 5) and result.video_top5 == 1.0
    assert result.clip_top1 == pytest.approx(9 / 15) and result.clip_top5 == 1.0
    assert result.confusion == [[0, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert result.per_class_top1 == pytest.approx([0, 2 / 3, 1]) and result.mean_class_top1 == pytest.approx(5 / 9)


@pytest.mark.parametrize("crops", [1, 3])
def test_video_scores_are_the_mean_softmax_of_their_clips(flat_data: Path, crops: int) -> None:
    loader = eval_loader(flat_data, clips_per_video=3, spatial_crops=crops)
    result = evaluate(LookupModel(TABLE), loader, init_distributed("cpu"), "fp32", keep_scores=True)
    check_figures(result)
    assert result.clips == 15 * crops
    assert result.scores is not None
    assert result.scores.ids.tolist() == [0, 1, 2, 3, 4] and result.scores.labels.tolist() == LABELS
    expected = np.stack([softmax(LOGITS[video]).mean(axis=0) for video in range(5)])
    np.testing.assert_allclose(result.scores.values, expected, rtol=1e-6)
    assert "mean-class top-1 55.56%" in result.format() and "0.00%  a (1 videos)" in result.format()


def test_top_k_above_the_class_count_counts_every_row() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_correct(logits, torch.tensor([2, 2]), (1, 2, 5)) == [1, 1, 2]


RANK_SCRIPT = """
import json, sys
from clipdata import LookupModel
from test_evaluate import TABLE, eval_loader
from dali_skd.data.source import video_id
from dali_skd.distributed import init_distributed, shutdown
from dali_skd.evaluation import evaluate, video_sources
ctx = init_distributed("cpu")
loader = eval_loader(sys.argv[1], clips_per_video=3, runtime=ctx.runtime())
result = evaluate(LookupModel(TABLE), loader, ctx, "fp32", keep_scores=True)
sources = video_sources(loader, ctx)
own = sorted(video_id(r.key, loader.layout.splits) for r in loader.reader.records())
if ctx.is_main:
    figures = {**result.to_json(), "ids": result.scores.ids.tolist(), "values": result.scores.values.tolist()}
    json.dump({**figures, "sources": sources, "own": own}, open(sys.argv[2], "w"))
loader.close()
shutdown(ctx)
"""


def test_two_ranks_count_each_video_once_and_gather_every_score(flat_data: Path, tmp_path: Path) -> None:
    script, out = tmp_path / "rank.py", tmp_path / "rank0.json"
    script.write_text(RANK_SCRIPT)
    run_two_ranks(script, str(flat_data), str(out))
    figures = json.loads(out.read_text())
    assert figures["own"] == [0, 1, 4]  # rank 0 read shards 0 and 2 of 3; rank 1 the rest
    loader = eval_loader(flat_data, clips_per_video=3)
    single = evaluate(LookupModel(TABLE), loader, init_distributed("cpu"), "fp32", keep_scores=True)
    assert {k: figures[k] for k in single.to_json()} == single.to_json()
    assert single.scores is not None and figures["ids"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(figures["values"], single.scores.values)
    assert figures["sources"] == {str(video): [f"test-{video:07d}", f"test/{video}.avi"] for video in range(5)}
