"""Side-by-side benchmarks: each ``bench/<name>.py`` defines ``main()`` and runs as
``python -m bench.<name>``; ``python -m bench`` runs them all. Figures go to docs/benchmarks.md."""
