"""Model parallelism for existing models: tensor, sequence, pipeline and sharded data parallel.

    dims = init_parallel(tp=2, pp=1, dp=-1)            # groups placed by the topology
    report = parallelize(model, dims, plan="auto")     # split in place; print(report)

See docs/parallel.md.
"""

from .dims import Layout, ParallelDims, ParallelDimsError, init_parallel, plan_layout
from .layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, ShardSpec,
                     VocabParallelEmbedding, gather_full)
from . import checkpoint  # noqa: F401  (save / load at any tp x dp)
from .optim import ShardedOptimizer
from .pipeline import Pipeline, pipeline_gpt
from .plans import KNOWN_MODELS, ParallelizeReport, PlanError, gather_state_dict, parallelize

__all__ = ["init_parallel", "plan_layout", "ParallelDims", "Layout", "ParallelDimsError",
           "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "ParallelLMHead", "ShardSpec", "gather_full",
           "parallelize", "ParallelizeReport", "PlanError", "KNOWN_MODELS", "gather_state_dict",
           "ShardedOptimizer", "pipeline_gpt", "Pipeline", "checkpoint"]
