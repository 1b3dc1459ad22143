"""The DALI pipeline: encoded clips in, augmented 3 x 16 x 112 x 112 views out. One definition serves the GPU
(decoders `mixed`, operators on the GPU) and the CPU (`device_id=None`, every operator on the CPU).

Its inputs come from the host side (`source.py`) by name: the bytes of each view's JPEG strips and where to cut
them, which frames to keep, and every random draw of the augmentations. The graph itself draws nothing, so the
same inputs always give the same outputs, on either device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dali_skd.config import AugmentConfig
from dali_skd.data.augment import AUGMENTATIONS, Augmentation
from dali_skd.data.source import INPUT_NORMS, Batch, InputLayout, draw_columns
from dali_skd.extras import missing_extra
from dali_skd.runtime import dali_extra_here

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.pipeline import DataNode, OperatorConcurrency
except ModuleNotFoundError as e:  # DALI comes with an extra: the build for this machine's CUDA
    raise missing_extra(e, dali_extra_here(), "the data pipeline (NVIDIA DALI)") from e

OUTPUT_DTYPES = {"fp32": types.FLOAT, "fp16": types.FLOAT16}
# --loader.concurrency: DALI's default (operators of one backend take turns), or every independent operator at once
CONCURRENCY = {"backend": OperatorConcurrency.BACKEND, "full": OperatorConcurrency.FULL}


@dataclass(frozen=True)
class DecoderOptions:
    """Settings of the `mixed` (GPU) JPEG decoders; the CPU decoder takes none of them."""

    hw_decoder_load: float = 0.65  # share of the images for the hardware JPEG decoder, the rest to CUDA
    preallocate_width_hint: int = 0  # 0: no preallocation
    preallocate_height_hint: int = 0

    def arguments(self, gpu: bool) -> dict:
        if not gpu:
            return {}
        # the CPU's chroma upsampling (libjpeg-turbo's "fancy" one), so that both devices give the same pixels; the
        # threads of the decoders' pools left to the OS, not bound to the CPUs DALI picks for the GPU (its default):
        # there is a pool per view and strip slot, all of them bound to the same CPUs otherwise
        args: dict = {"jpeg_fancy_upsampling": True, "hw_decoder_load": self.hw_decoder_load, "affine": False}
        if self.preallocate_width_hint > 0 and self.preallocate_height_hint > 0:
            args.update(
                preallocate_width_hint=self.preallocate_width_hint,
                preallocate_height_hint=self.preallocate_height_hint,
            )
        return args


class Draws:
    """One view's random draws (from its `value`, `coin` and `choice` inputs), by name (`source.draw_columns`)."""

    def __init__(self, inputs: dict[str, DataNode], view: int, augmented: bool) -> None:
        self._inputs, self._view, self._columns = inputs, view, draw_columns(augmented)

    def __call__(self, kind: str, name: str) -> DataNode:
        """The draw `kind` ("value", "coin", "choice") of `name` (an augmentation, or crop_x and crop_y)."""
        return self._inputs[kind][self._view, self._columns[kind].index(name)]

    def parameter(self, aug: Augmentation) -> DataNode | None:
        if aug.range is not None:
            return self("value", aug.name)
        return self("choice", aug.name) if aug.choices else None


def decode_clips(
    inputs: dict[str, DataNode], layout: InputLayout, decoder: str, crop: int, options: DecoderOptions
) -> list[DataNode]:
    """One FHWC uint8 clip per view, cropped to its window: each decoded piece is cropped before the pieces are
    joined, so the joins copy only the window."""
    windows = [crop_window(crop, Draws(inputs, v, layout.augmented)) for v in range(layout.num_views)]
    if layout.format == "vp9":
        # both views in one call: the decoder seeks once per video
        frames = fn.decoders.video(inputs["video"], frames=inputs["frames"], device=decoder)
        return [windows[v](frames[v * layout.clip_len : (v + 1) * layout.clip_len]) for v in range(layout.num_views)]
    clips = []
    for v in range(layout.num_views):
        pieces = []
        for k in range(layout.slots):
            slot = inputs["slots"][v, k]  # byte start, byte length, then the FHWC shape of the decoded frames
            jpeg = fn.slice(inputs["strips"], slot[0:1], slot[1:2], axes=[0])  # one strip of the video's
            top = fn.decoders.image_slice(
                jpeg,
                np.array([0], np.int32),
                slot[2:3] * slot[3:4],  # pixel rows: frames x frame height
                axes=[0],
                normalized_anchor=False,
                normalized_shape=False,
                device=decoder,
                **options.arguments(decoder == "mixed"),
            )
            pieces.append(windows[v](fn.reshape(top, shape=slot[2:6], layout="FHWC")))
        frames = fn.cat(*pieces, axis=0) if len(pieces) > 1 else pieces[0]
        clips.append(fn.sequence_rearrange(frames, new_order=inputs["order"][v]))
    return clips


def crop_window(crop: int, draws: Draws) -> Callable[[DataNode], DataNode]:
    """A crop x crop window at the drawn place (0.5, 0.5: the centre): applied to every piece of a clip, it cuts
    the same window from all of its frames."""
    x, y = draws("value", "crop_x"), draws("value", "crop_y")

    def window(frames: DataNode) -> DataNode:
        return fn.crop(frames, crop=(crop, crop), crop_pos_x=x, crop_pos_y=y)

    return window


def augment_clip(clip: DataNode, aug: AugmentConfig, draws: Draws) -> tuple[DataNode, DataNode | int]:
    """The table's augmentations (`data/augment.py`), in its order, each applied with its own probability, one draw
    per clip; and the mirror `to_network_input` applies (the flip, done as it normalises). An augmentation of
    probability 0 is left out of the graph, one of probability 1 applied without a branch."""
    mirror: DataNode | int = 0
    chances = aug.chances()
    for a in AUGMENTATIONS.values():
        applies = _applies(chances[a.name], draws, a.name)
        if a.dali is None:
            mirror = fn.cast(applies, dtype=types.INT32) if isinstance(applies, DataNode) else int(applies)
        elif applies:
            clip = a.dali(fn, clip, draws.parameter(a))
    return clip, mirror


def _applies(p: float, draws: Draws, name: str) -> DataNode | bool:
    """The clip's coin for an augmentation; a plain bool when p is 0 or 1 (no work, no branch)."""
    if p <= 0 or p >= 1:
        return p >= 1
    return draws("coin", name)


def to_network_input(
    clip: DataNode, flip: DataNode | int, dtype: str, norm: str, output_layout: str = "CFHW"
) -> DataNode:
    """Optional mirror, values normalised (`INPUT_NORMS`), FHWC -> `output_layout` (CFHW, or FHWC: a batch of them
    permuted to N x C x F x H x W is channels_last_3d in memory already), in one pass."""
    mean, std = INPUT_NORMS[norm]
    return fn.crop_mirror_normalize(
        clip, mirror=flip, mean=mean, std=std, dtype=OUTPUT_DTYPES[dtype], output_layout=output_layout
    )


@pipeline_def(enable_conditionals=True)
def clip_pipeline(
    source: Callable[[], Batch],
    layout: InputLayout,
    crop: int,
    augment: AugmentConfig | None,
    dtype: str,
    gpu: bool,
    in_flight: int,
    input_norm: str = "paper",
    decoder_options: DecoderOptions = DecoderOptions(),
    clip_layout: str = "CFHW",
):
    """Outputs (`layout.outputs`): one N x 3 x T x crop x crop tensor per view (`clip_layout` FHWC: N x T x crop
    x crop x 3), then the labels (and the video ids, for evaluation), on the GPU with `gpu`. `augment`: the
    paper's augmentations, as drawn by the host side; None: crop only. `in_flight`: batches to keep alive for DALI
    (`named_inputs`): the prefetch depth + 1 at least. `input_norm`: the pixel values the network sees
    (`INPUT_NORMS`)."""
    if (augment is not None) != layout.augmented:
        raise ValueError("the layout must carry the augmentations' draws exactly when the pipeline augments")
    inputs = named_inputs(source, layout, in_flight)
    views = []
    for v, clip in enumerate(decode_clips(inputs, layout, "mixed" if gpu else "cpu", crop, decoder_options)):
        mirror: DataNode | int = 0
        if augment is not None:
            clip, mirror = augment_clip(clip, augment, Draws(inputs, v, augmented=True))
        views.append(to_network_input(clip, mirror, dtype, input_norm, clip_layout))
    extras = [inputs["label"]] + ([inputs["video_id"]] if layout.with_video_id else [])
    if gpu:  # copied by DALI, ordered on its stream: PyTorch gets them on the device without a blocking copy
        extras = [e.gpu() for e in extras]
    return (*views, *extras)


def named_inputs(source: Callable[[], Batch], layout: InputLayout, in_flight: int) -> dict[str, DataNode]:
    """The external inputs, by name: `source` returns a dict keyed by `layout.names`, checked on every batch.

    DALI reads the batches where they lie (`no_copy`): a shard's bytes are not copied once more on the host. So the
    last `in_flight` batches (at least the prefetch depth + 1) are kept alive here until DALI is done with them."""
    nodes = fn.external_source(
        source=_KeptAlive(source, layout, in_flight), num_outputs=len(layout.names), batch=True, no_copy=True
    )
    return {name: nodes[i] for i, name in enumerate(layout.names)}  # (DALI's autograph has no zip(strict=))


class _KeptAlive:
    """Arranges each batch in the pipeline's input order and holds the last `count` ones."""

    def __init__(self, source: Callable[[], Batch], layout: InputLayout, count: int) -> None:
        self._source, self._layout = source, layout
        self._held: deque[tuple] = deque(maxlen=count)

    def __call__(self) -> tuple:
        batch = self._layout.arrange(self._source())
        self._held.append(batch)
        return batch


@pipeline_def
def passthrough_pipeline(source: Callable[[], Batch], layout: InputLayout, in_flight: int):
    """The host side alone (`cli.py bench --loaders host`): the same inputs, handed back unchanged, but for the
    shards' bytes, of which only the sizes come back (the real pipeline never copies them whole either)."""
    inputs = named_inputs(source, layout, in_flight)
    return tuple(node.shape() if layout.inputs[name].shape is None else node for name, node in inputs.items())
