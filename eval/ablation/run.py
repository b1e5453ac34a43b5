"""The ablation pipeline behind scripts/run_ablation.py, one resumable piece at a time.

    <out>/stage1/                      the shared stage-1 run (unless stage1_export is given)
    <out>/variants/<name>/stage2/      that variant's stage 2 (export/viq/ is its tokenizer)
    <out>/variants/<name>/codes/       its code cache (extracted by the MLLM launch)
    <out>/variants/<name>/mllm/        the MLLM trained on those codes (hf/ is evaluated)
    <out>/variants/blind/mllm/         the blind baseline: the reference tokenizer, vision.source none
    <out>/eval/<row>/                  eval.run's predictions and scores, one folder per row
    <out>/logs/*.log                   every launch's output
    <out>/rows/<row>.json              a finished row's numbers (a rerun skips it)
    <out>/table.{md,json,png}          the Table-4-shaped report

Every launch goes through the real entry points (deepspeed scripts/train_viq.py and
scripts/train_mllm.py, python -m eval.run) with `--resume auto`, so an interrupted ablation
restarts where it stopped: finished rows are read back, a half-trained launch resumes from its
last checkpoint, eval.run keeps the predictions it has.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from eval.ablation.config import BLIND, AblationConfig, VariantConfig
from viq.errors import UserError
from viq.io import atomic_write_json, read_json, read_jsonl_objects

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
LAST_LOGGED = 3  # the VAE-latent loss is the mean of stage 2's last logged values


class AblationError(UserError):
    """A launch of the ablation failed; the message names its log."""


def deepspeed_bin() -> str:
    return str(Path(sys.executable).parent / "deepspeed")


class AblationRun:
    def __init__(self, cfg: AblationConfig):
        self.cfg = cfg
        self.out = cfg.out_dir
        self.launches = 0
        self.common = [f"data.root={cfg.data_root}", f"data.synthetic_n={cfg.synthetic_n}",
                       "trainer.progress=false", "trainer.tensorboard=false"]
        if cfg.data_train:
            self.common.append(f"data.train={cfg.data_train}")

    # ---- launches -------------------------------------------------------------------------------
    def _run(self, cmd: list[str], log_name: str) -> float:
        """Run one command from the repository root, its output in logs/<log_name>.log; wall seconds."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{log_name}.log"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        log.info(f"{log_name}: {' '.join(cmd[:4])} ... (log: {path})")
        start = time.perf_counter()
        with open(path, "a") as handle:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        if code != 0:
            tail = [line.split(" (VIQ_DEBUG")[0].strip() for line in path.read_text(errors="replace").splitlines()
                    if "error" in line.lower()][-1:]
            raise AblationError(f"{log_name} exited with {code}; see {path}" + (f" ({tail[0][:300]})" if tail else ""))
        return seconds

    def _train(self, script: str, launch, run_dir: Path, extra: list[str], log_name: str) -> float:
        port = self.cfg.master_port + self.launches % 50
        self.launches += 1
        cmd = [deepspeed_bin(), "--num_gpus", str(self.cfg.ranks), "--master_port", str(port), script,
               "--config", launch.config, "--run-dir", str(run_dir), "--resume", "auto"]
        if launch.steps:
            cmd += ["--max-steps", str(launch.steps)]
        for item in [*self.common, *launch.overrides, *extra]:
            cmd += ["--set", item]
        return self._run(cmd, log_name)

    # ---- pieces -----------------------------------------------------------------------------------
    def stage1_export(self) -> Path:
        if self.cfg.stage1_export:
            return Path(self.cfg.stage1_export)
        run = self.out / "stage1"
        if not (run / "export" / "viq" / "config.json").is_file():
            self._train("scripts/train_viq.py", self.cfg.stage1, run, ["viq_train.stage=1"], "stage1")
        return run / "export"

    def stage2(self, variant: VariantConfig, stage1: Path) -> Path:
        run = self.out / "variants" / variant.name / "stage2"
        if not (run / "export" / "viq" / "config.json").is_file():
            switches = [f"viq_train.quant.{f.name}={getattr(variant.quant, f.name)}" for f in fields(variant.quant)]
            self._train("scripts/train_viq.py", self.cfg.stage2, run,
                        ["viq_train.stage=2", f"viq_train.init_from={stage1}", f"viq_train.vae_weight={variant.vae_weight}",
                         *switches], f"{variant.name}-stage2")
        return run

    def mllm(self, name: str, viq_dir: Path, blind: bool = False) -> Path:
        run = self.out / "variants" / name / "mllm"
        if not (run / "hf" / "viq_mllm.json").is_file():
            source = ["vision.source=none"] if blind else [
                "vision.source=codes", f"vision.codes_dir={self.out / 'variants' / name / 'codes'}"]
            self._train("scripts/train_mllm.py", self.cfg.mllm, run, [f"model.viq={viq_dir}", *source], f"{name}-mllm")
        return run / "hf"

    def evaluate(self, name: str, export: Path) -> dict:
        e = self.cfg.eval
        cmd = [sys.executable, "-m", "eval.run", "--model", str(export), "--model-name", name,
               "--benchmarks", ",".join(e.benchmarks), "--data-root", str(self.cfg.benchmark_root),
               "--out", str(self.out / "eval"), "--max-new-tokens", str(e.max_new_tokens),
               "--batch-size", str(e.batch_size), "--device", "cpu" if not torch.cuda.is_available() else "cuda"]
        if e.limit:
            cmd += ["--limit", str(e.limit)]
        self._run(cmd, f"{name}-eval")
        return read_json(self.out / "eval" / name / "scores.json")

    # ---- rows -------------------------------------------------------------------------------------
    def row(self, variant: VariantConfig | None, stage1: Path, reference_viq: Path | None) -> dict:
        name = variant.name if variant else BLIND
        done = self.out / "rows" / f"{name}.json"
        if done.is_file():
            log.info(f"{name}: finished before, read back from {done}")
            return read_json(done)
        row: dict = {"name": name, "label": (variant.label or variant.name) if variant else "blind (no image information)"}
        if variant is not None:
            stage2 = self.stage2(variant, stage1)
            row.update(variant=asdict(variant), **stage2_numbers(stage2))
            viq_dir = stage2 / "export" / "viq"
            export = self.mllm(name, viq_dir)
            row.update(code_numbers(self.out / "variants" / name / "codes", viq_dir))
        else:
            row["variant"] = None
            export = self.mllm(BLIND, reference_viq, blind=True)
        row["mllm_final_loss"] = final_loss(export.parent)
        row["scores"] = self.evaluate(name, export)
        done.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(done, row, indent=1)
        return row

    def run(self) -> list[dict]:
        start = time.perf_counter()
        stage1 = self.stage1_export()
        rows = [self.row(v, stage1, None) for v in self.cfg.variants]
        if self.cfg.blind:
            reference = self.out / "variants" / self.cfg.variants[0].name / "stage2" / "export" / "viq"
            rows.append(self.row(None, stage1, reference))
        log.info(f"ablation {self.cfg.name}: {len(rows)} rows in {time.perf_counter() - start:.0f} s this run")
        return rows


    def finished_rows(self) -> list[dict]:
        """The rows finished so far, in table order (a report of an ablation still running)."""
        names = [v.name for v in self.cfg.variants] + ([BLIND] if self.cfg.blind else [])
        return [read_json(self.out / "rows" / f"{n}.json") for n in names if (self.out / "rows" / f"{n}.json").is_file()]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [row for _, row in read_jsonl_objects(path)] if path.is_file() else []


def final_loss(run_dir: Path) -> float | None:
    rows = [r for r in _metrics(run_dir) if "loss" in r]
    return rows[-1]["loss"] if rows else None


def stage2_numbers(run_dir: Path) -> dict:
    """Stage 2's training time per step (mean of the logged step times) and its last VAE-latent loss."""
    rows = _metrics(run_dir)
    timed = [r["step_time_s"] for r in rows if "step_time_s" in r]
    vae = [r["vae_latent_loss"] for r in rows if r.get("vae_latent_loss") is not None]
    commit = [r["commit_loss"] for r in rows if r.get("commit_loss") is not None]
    return {
        "stage2_steps": rows[-1]["step"] if rows else 0,
        "stage2_step_s": sum(timed) / len(timed) if timed else None,
        "vae_latent_loss": sum(vae[-LAST_LOGGED:]) / len(vae[-LAST_LOGGED:]) if vae else None,
        "commit_loss": commit[-1] if commit else None,
    }


def code_numbers(codes_dir: Path, viq_dir: Path) -> dict:
    """Codebook usage (fraction of codes that occur) and perplexity over the variant's whole code cache."""
    from data.shards import CodeStore
    from viq.fsq import codebook_stats
    from viq.model import ViQConfig

    store = CodeStore(codes_dir)
    size = ViQConfig.load(viq_dir).codebook_size
    codes = torch.cat([torch.as_tensor(store.get(k)).reshape(-1) for k in store.keys()]) if len(store) else torch.zeros(0)
    stats = codebook_stats(codes, size)
    return {"codebook_size": size, "codes_counted": int(codes.numel()), **stats}


