"""Training: the trainer, its options, checkpoint files, random state and logs.

    from ocrnet.engine import TrainOptions, train
    result = train("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024",
                   TrainOptions(data_root="data/cityscapes"))
"""

from .checkpointing import (CheckpointInvalid, find_resume_checkpoint, load_training_checkpoint,
                            save_training_checkpoint)
from .options import TrainOptions, poly_lr
from .trainer import Trainer, train

__all__ = ["CheckpointInvalid", "TrainOptions", "Trainer", "find_resume_checkpoint",
           "load_training_checkpoint", "poly_lr", "save_training_checkpoint", "train"]
