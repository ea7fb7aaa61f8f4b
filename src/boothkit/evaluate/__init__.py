"""Measuring what training did: the paper's metrics, DreamBench, binding, sweeps and experiments, recognition on
mini, speed, and the demo page that shows them."""
