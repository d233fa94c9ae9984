"""Training: :class:`Trainer` (two DeepSpeed engines, the loop, checkpoints, watching) and
:func:`run_training`, which validates the options on every rank, joins the process group and trains.

``python -m brats_gan.train`` (``deepspeed --module brats_gan.train``) runs this package's ``__main__``, the
command line's :mod:`brats_gan.commands.train`; the library modules here never import the command line.
"""

from brats_gan.train.trainer import (
    CheckpointError,
    DeviceOutOfMemory,
    Trainer,
    TrainingDiverged,
    build_engine,
    engine_loss,
    run_training,
    stopped_message,
)

__all__ = ["CheckpointError", "DeviceOutOfMemory", "Trainer", "TrainingDiverged", "build_engine", "engine_loss",
           "run_training", "stopped_message"]
