"""Script-side helpers: command line, data, checkpoints, distributed setup and the training loop.

Import the submodules directly (``from utils.cli import run_cli``); this package imports nothing heavy.
"""
