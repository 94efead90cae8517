"""`python -m engine.kernels`: build the CPU kernels now (the Makefile runs it at install)."""
import logging
import sys

from engine.kernels import cpu_ops

logging.basicConfig(level=logging.INFO, format="%(message)s")
ops = cpu_ops()
print(f"pdserve CPU kernels: {ops.isa() if ops else 'not available (plain torch fallback)'}")
sys.exit(0)
