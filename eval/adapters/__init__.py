"""Wrappers that let other harnesses run a ViQ-MLLM export: VLMEvalKit (vlmevalkit.py, its
import on CPU machines in vlmeval_import.py) and lm-evaluation-harness for text-only tasks
(lm_eval.py). Neither harness is a dependency of the package (./dev.sh installs pinned ones for
the tests): each module imports without it and explains in one line what to install when used."""
