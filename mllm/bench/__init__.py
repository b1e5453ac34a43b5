"""Benchmark-only code: the trainer, the engine and the models never import it.

    throughput.py  codes vs encoders in the loop through the real trainer (scripts/bench_throughput.py)
    encoders.py    the continuous encoders + projectors of that comparison, and their FLOPs
    report.py      its markdown tables and the Figure-3-style PNG
    encode.py      ViQ encode throughput and code storage (scripts/bench_viq.py)
    data_path.py   packing efficiency, loader throughput, shard I/O (scripts/bench_data.py)
"""
