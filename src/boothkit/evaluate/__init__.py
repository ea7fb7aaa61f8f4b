"""Measuring what training did: the paper's metrics, DreamBench, the prior-preservation effect, binding, sweeps
and experiments, recognition on mini, speed, and the demo page that shows them."""
