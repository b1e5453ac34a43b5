"""Benchmark registry: VLMEvalKit dataset keys -> benchmark classes (one file each)."""
from __future__ import annotations

from eval.benchmarks.ai2d import AI2D
from eval.benchmarks.base import Benchmark, ChoiceBenchmark, VQABenchmark
from eval.benchmarks.chartqa import ChartQA
from eval.benchmarks.docvqa import DocVQA
from eval.benchmarks.infovqa import InfoVQA
from eval.benchmarks.mmmu import MMMU
from eval.benchmarks.mmstar import MMStar
from eval.benchmarks.ocrbench import OCRBench
from eval.benchmarks.simplevqa import SimpleVQA
from eval.benchmarks.synthetic import SynthChart, SynthDoc, SynthShapes, SynthVideo
from eval.benchmarks.textvqa import TextVQA
from viq.errors import ConfigError

BENCHMARKS: dict[str, type[Benchmark]] = {
    'MMStar': MMStar,
    'MMMU_DEV_VAL': MMMU,
    'SimpleVQA': SimpleVQA,
    'InfoVQA_VAL': InfoVQA,
    'TextVQA_VAL': TextVQA,
    'DocVQA_VAL': DocVQA,
    'OCRBench': OCRBench,
    'AI2D_TEST': AI2D,
    'ChartQA_TEST': ChartQA,
    'SYNTH_CHART': SynthChart,
    'SYNTH_DOC': SynthDoc,
    'SYNTH_SHAPES': SynthShapes,
    'SYNTH_VIDEO': SynthVideo,
    # The synthetic validation family also answers to SYNTH_VAL_<NAME>.
    'SYNTH_VAL_CHART': SynthChart,
    'SYNTH_VAL_DOC': SynthDoc,
    'SYNTH_VAL_SHAPES': SynthShapes,
}

# The nine benchmarks of the ViQ paper's Table 2, in its column order.
PAPER_BENCHMARKS = ('MMStar', 'MMMU_DEV_VAL', 'SimpleVQA', 'InfoVQA_VAL', 'TextVQA_VAL', 'DocVQA_VAL',
                    'OCRBench', 'AI2D_TEST', 'ChartQA_TEST')


class UnknownBenchmarkError(ConfigError, KeyError):
    """A benchmark key that is not in BENCHMARKS; still a KeyError for callers that catch lookups."""

    def __str__(self):   # KeyError would quote the message
        return str(self.args[0])


def get_benchmark(key: str, version=None, **kwargs) -> Benchmark:
    """The benchmark for a VLMEvalKit key, scoring as `version` (eval.vlmevalkit_versions; default:
    main) does; unknown keys fail listing the valid ones."""
    if key not in BENCHMARKS:
        raise UnknownBenchmarkError(f'unknown benchmark {key!r}; valid keys: {", ".join(BENCHMARKS)}')
    return BENCHMARKS[key](key, version=version, **kwargs)


__all__ = ['BENCHMARKS', 'PAPER_BENCHMARKS', 'Benchmark', 'ChoiceBenchmark', 'UnknownBenchmarkError', 'VQABenchmark',
           'get_benchmark']
