"""Tooling around the worker, not the worker: the demo, the load generator, the embedded
broker and Redis launcher, and the cuttable TCP proxy. Tests, benchmarks and
``python -m stream_detector demo|loadgen`` use them; ``run`` never imports them.
"""
