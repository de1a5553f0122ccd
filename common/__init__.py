"""synthperf common layer."""
