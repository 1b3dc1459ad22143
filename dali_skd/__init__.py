"""dali-skd: SKD-SRL (self-knowledge distillation with Siamese representation learning) for video
action recognition, with NVIDIA DALI decoding two augmented views per clip."""

__version__ = "0.1.0"
