"""The pipeline stages: classify -> load -> core -> synthesize -> measure -> encode -> push."""
