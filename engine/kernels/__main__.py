"""`python -m engine.kernels [--require]`: build the CPU kernels now (the Makefile runs it at
install). Without them pdserve still runs, on plain torch ops; `--require` (the Dockerfile's build
step) turns that into a failure, so an image never ships without its kernels unnoticed."""
import argparse
import logging
import sys

from engine.kernels import cpu_ops

parser = argparse.ArgumentParser(prog="python -m engine.kernels", description=__doc__)
parser.add_argument("--require", action="store_true", help="exit 1 when the kernels cannot be built or loaded")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")
ops = cpu_ops()
print(f"pdserve CPU kernels: {ops.isa() if ops else 'not available (plain torch fallback)'}")
sys.exit(1 if args.require and ops is None else 0)
