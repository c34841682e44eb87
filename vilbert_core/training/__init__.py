"""ViLBERT training: masking, losses, optimiser and schedule, checkpoints, DDP, and `run_train`.

from vilbert_core.training import TrainArgs, run_train
run_train(TrainArgs(task="vqa", data="vqa_train/", out="runs/vqa", vocab="vocab.txt", config="tiny"))
"""

from .trainer import TrainArgs, TrainingDiverged, TrainingError, run_train

__all__ = ["TrainArgs", "TrainingDiverged", "TrainingError", "run_train"]
