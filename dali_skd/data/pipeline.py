"""The DALI pipeline: encoded clips in, augmented 3 x 16 x 112 x 112 views out. One definition serves the GPU
(decoders `mixed`, operators on the GPU) and the CPU (`device_id=None`, every operator on the CPU)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import DataNode

from dali_skd.config import AugmentConfig
from dali_skd.data.source import Columns, InputLayout

OUTPUT_DTYPES = {"fp32": types.FLOAT, "fp16": types.FLOAT16}


def decode_clips(
    inputs: dict[str, DataNode], layout: InputLayout, decoder: str, crop: int, random_crop: bool
) -> list[DataNode]:
    """One FHWC uint8 clip per view, cropped to its window: each decoded piece is cropped before the pieces are
    joined, so the joins copy only the window."""
    windows = [crop_window(crop, random_crop) for _ in range(layout.num_views)]
    if layout.format == "vp9":
        # both views in one call: the decoder seeks once per video
        frames = fn.decoders.video(inputs["video"], frames=inputs["frames"], device=decoder)
        return [windows[v](frames[v * layout.clip_len : (v + 1) * layout.clip_len]) for v in range(layout.num_views)]
    clips = []
    for v in range(layout.num_views):
        pieces = []
        for k in range(layout.slots):
            strip = fn.decoders.image_slice(
                inputs[f"v{v}_strip{k}"],
                np.array([0], np.int32),
                inputs[f"v{v}_rows{k}"],
                axes=[0],
                normalized_anchor=False,
                normalized_shape=False,
                device=decoder,
            )
            pieces.append(windows[v](fn.reshape(strip, shape=inputs[f"v{v}_shape{k}"], layout="FHWC")))
        frames = fn.cat(*pieces, axis=0) if len(pieces) > 1 else pieces[0]
        clips.append(fn.sequence_rearrange(frames, new_order=inputs[f"v{v}_order"]))
    return clips


def crop_window(crop: int, random_crop: bool) -> Callable[[DataNode], DataNode]:
    """A crop x crop window, at a random place or the centre, drawn once: applied to every piece of a clip it
    cuts the same window from all of its frames."""
    pos = {}
    if random_crop:
        pos = {"crop_pos_x": fn.random.uniform(range=(0.0, 1.0)), "crop_pos_y": fn.random.uniform(range=(0.0, 1.0))}

    def window(frames: DataNode) -> DataNode:
        return fn.crop(frames, crop=(crop, crop), **pos)

    return window


def augment_clip(clip: DataNode, aug: AugmentConfig) -> DataNode:
    """The paper's colour and blur augmentations, each drawn once per clip with its own probability.

    The flip is left to `to_network_input`, which mirrors while it normalises.
    """
    if _coin(aug.p_contrast):
        clip = fn.brightness_contrast(clip, contrast=fn.random.uniform(range=aug.contrast))
    if _coin(aug.p_brightness):
        clip = fn.brightness_contrast(clip, brightness=fn.random.uniform(range=aug.brightness))
    if _coin(aug.p_hue):
        clip = fn.hue(clip, hue=fn.random.uniform(range=aug.hue))
    if _coin(aug.p_blur):
        clip = fn.gaussian_blur(clip, sigma=fn.random.uniform(range=aug.blur_sigma))
    if _coin(aug.p_channel_split):
        channel = clip[:, :, :, fn.random.uniform(values=[0, 1, 2], dtype=types.INT32)]
        clip = fn.stack(channel, channel, channel, axis=3, axis_name="C")
    return clip


def _coin(p: float, dtype: types.DALIDataType = types.BOOL) -> DataNode | bool:
    """A per-clip draw that is true with probability p; a plain bool when p is 0 or 1 (no work, no branch)."""
    if p <= 0 or p >= 1:
        return p >= 1
    return fn.random.coin_flip(probability=p, dtype=dtype)


def to_network_input(clip: DataNode, flip: DataNode | bool, dtype: str) -> DataNode:
    """Optional mirror, values to [-1, 1], FHWC -> CFHW, in one pass."""
    return fn.crop_mirror_normalize(
        clip, mirror=flip, mean=[127.5] * 3, std=[127.5] * 3, dtype=OUTPUT_DTYPES[dtype], output_layout="CFHW"
    )


@pipeline_def(enable_conditionals=True)
def clip_pipeline(
    source: Callable[[], Columns],
    layout: InputLayout,
    crop: int,
    augment: AugmentConfig | None,
    random_crop: bool,
    dtype: str,
    gpu: bool,
):
    """Outputs: one N x 3 x T x crop x crop tensor per view, then the labels (and the video ids, for evaluation).

    Train: `random_crop` and, unless the method trains without them, `augment`. Evaluation: centre crop only.
    """
    names = layout.names
    nodes = fn.external_source(source=source, num_outputs=len(names), batch=True)
    inputs = {name: nodes[i] for i, name in enumerate(names)}  # (DALI's autograph has no zip(strict=))
    views = []
    for clip in decode_clips(inputs, layout, "mixed" if gpu else "cpu", crop, random_crop):
        if augment is not None:
            clip = augment_clip(clip, augment)
        flip = _coin(augment.p_flip, types.INT32) if augment is not None else False
        views.append(to_network_input(clip, flip, dtype))
    extras = [inputs["label"]] + ([inputs["video_id"]] if layout.with_video_id else [])
    return (*views, *extras)
