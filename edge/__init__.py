"""edge: a teachable camera box for the Raspberry Pi."""

import os

# The head's matrices are small; BLAS worker threads only fight the inference threads for the
# Pi's cores (measured here: a 1x1280 @ 1280x1024 product took 16 ms with 2 busy-waiting OpenBLAS
# threads against 0.2 ms with one). Set before numpy loads; an explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
