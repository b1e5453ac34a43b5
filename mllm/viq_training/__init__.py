"""Training the ViQ tokenizer itself (ViQ paper, stages 1 and 2) on the MLLM trainer.

    config.py   ViQTrainConfig: the MLLM TrainConfig + the `viq_train` section
    model.py    ViQTrainModel: tokenizer + projector + the project's ViQMLLM (+ teacher, VAE-latent head)
    trainer.py  ViQTrainer: the resolution schedule, the EMA teacher, the bottleneck centring
    export.py   export/: viq/, llm/, projector.safetensors
"""
from mllm.viq_training.config import PhaseConfig, ViQStageConfig, ViQTrainConfig
from mllm.viq_training.export import EXPORT_DIR
from mllm.viq_training.model import ViQTrainModel, projector
from mllm.viq_training.trainer import ViQTrainer

__all__ = ["EXPORT_DIR", "PhaseConfig", "ViQStageConfig", "ViQTrainConfig", "ViQTrainModel", "ViQTrainer", "projector"]
