"""layerline: pipeline-parallel LLM inference across mismatched machines over gRPC."""

import os

# Matrix products that do not depend on the thread count: MKL (torch's CPU BLAS on x86) otherwise picks kernels and
# splits by the number of threads, and on AVX-512 machines the last bits of a product then differ between a stage
# run with 1 thread and its replica with 2, so a failover could continue with other tokens. Read by MKL at its first
# call, so it is set before any; a value the user set stands.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
