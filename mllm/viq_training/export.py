"""The export of a tokenizer-training run: what stage 2 and the MLLM stack load afterwards.

    runs/<name>/export/viq/                  ViQModel.from_pretrained loads it (decoder/ too after stage 2)
    runs/<name>/export/llm/                  the LLM the tokenizer was aligned with (an MLLM export)
    runs/<name>/export/projector.safetensors the projector from tokenizer features to the LLM
"""
from __future__ import annotations

from pathlib import Path

from mllm.engine import gathered
from mllm.export import save_export

EXPORT_DIR = "export"


def export_stage(trainer) -> Path:
    """Write the export of `trainer` (a ViQTrainer): parameters gathered, rank 0 writes, all ranks wait."""
    from safetensors.torch import save_file

    from viq.io import atomic_path

    out = trainer.run_dir / EXPORT_DIR
    model = trainer.model
    stage = trainer.ds_config["zero_optimization"]["stage"]
    with gathered(stage)(list(model.parameters()), modifier_rank=None):
        if trainer.is_main:
            out.mkdir(parents=True, exist_ok=True)
            model.viq.save_pretrained(out / "viq")
            if model.decoder is not None:
                model.decoder.save_pretrained(out / "viq")
            save_export(model.mllm, trainer.tokenizer, trainer.vocab, out / "llm")
            state = {k: v.detach().float().cpu().contiguous() for k, v in model.projector.state_dict().items()}
            with atomic_path(out / "projector.safetensors") as tmp:
                save_file(state, str(tmp))
    trainer.barrier()
    return out
