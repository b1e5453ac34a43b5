"""Wrappers that let other harnesses run a ViQ-MLLM export: VLMEvalKit (vlmevalkit.py) and
lm-evaluation-harness for text-only tasks (lm_eval.py). Neither harness is a dependency:
each module imports without it and explains what to install when used."""
