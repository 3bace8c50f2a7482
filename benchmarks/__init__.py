"""Benchmarks of utuning: speed and memory against full fine-tuning and HF PEFT, and accuracy
through ``utuning train`` recipes. One command regenerates the results page::

    python -m benchmarks.run --quick     # CI check, < 3 minutes on 2 CPU cores
    python -m benchmarks.run --full      # the page in benchmarks/README.md
"""
