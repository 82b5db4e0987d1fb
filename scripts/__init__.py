"""Command lines over the repository's packages. Run them from the repository root as modules, e.g.
``python -m scripts.benchmark --help``, ``python -m scripts.gpu_report --help``, ``python -m scripts.demo``;
the root is then on ``sys.path`` without any edit of it."""
