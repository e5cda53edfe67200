"""The offline teacher cache (issue 17): per token, a sparse form of the teacher's next-token
distribution (:class:`methods.sparse_targets.SparseTargets`), written once by ``gkd
cache-teacher`` and read by every distillation from it. The format is in the README section
"Teacher cache format" and :mod:`gkd_cli.teacher_cache.format`."""

from gkd_cli.teacher_cache.cache import (
    CacheError,
    CacheKey,
    CacheReader,
    CacheSpec,
    CacheWriter,
    finalize,
)
from gkd_cli.teacher_cache.format import QUANTIZATIONS, Layout, id_bits

__all__ = [
    "QUANTIZATIONS",
    "CacheError",
    "CacheKey",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "Layout",
    "finalize",
    "id_bits",
]
