"""Tokenizer ablations in the shape of the ViQ paper's Table 4 (scripts/run_ablation.py).

    config.py   AblationConfig: configs/ablation/<name>.yaml
    run.py      AblationRun: stage 1 once, then per variant stage 2 -> codes -> MLLM -> eval, resumable
    report.py   table.md / table.json / table.png
"""
from eval.ablation.config import BLIND, AblationConfig, LaunchConfig, VariantConfig, load_ablation_config
from eval.ablation.report import write_table
from eval.ablation.run import AblationError, AblationRun

__all__ = ["BLIND", "AblationConfig", "AblationError", "AblationRun", "LaunchConfig", "VariantConfig",
           "load_ablation_config", "write_table"]
