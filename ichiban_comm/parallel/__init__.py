"""Model parallelism for existing models: tensor, sequence, pipeline and sharded data parallel.

    dims = init_parallel(tp=2, pp=1, dp=-1)            # groups placed by the topology
    report = parallelize(model, dims, plan="auto")     # split in place; print(report)

See docs/parallel.md.
"""

from .dims import Layout, ParallelDims, ParallelDimsError, init_parallel, plan_layout

__all__ = ["init_parallel", "plan_layout", "ParallelDims", "Layout", "ParallelDimsError"]
