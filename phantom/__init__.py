"""synthperf phantom layer."""
