"""Side-by-side benchmarks of msstore's hot paths (the performance issue).

``msstore bench [--scale ci|full]`` calls :func:`benchmarks.run.main`; from Python or a
notebook use :func:`benchmarks.run.run_suite` (results as DataFrames) or
:func:`benchmarks.run.run` (prints the table, writes CSV and PNG into ``benchmarks/results``).

=====  ===============  ====================================================================
id     module           candidate vs baseline
=====  ===============  ====================================================================
1      ``flush``        each flusher vs the seed's ``flushAgent`` and the COPY + merge floor
2      ``write``        ``write_state`` vs a raw ``kv.put``
3      ``l1``           tiered-cache L1 hit vs await-dict, cachetools, cashews
4      ``hydrate``      ``hydrate_agent`` vs the seed's put-per-key loop
5      ``write_behind`` write-behind vs write-through under Zipf
6      ``read_path``    tiered cache vs PostgreSQL-only and KV-only reads under Zipf
10     ``langgraph``    ``MsstoreSaver`` vs ``AsyncPostgresSaver``: overhead, 16 threads, rows
11     ``cluster``      R3 vs R1, fsync ``always`` vs default, 2/4 flusher processes vs 1
=====  ===============  ====================================================================
"""

from .common import SCALES, Comparison
from .run import SuiteResult, main, markdown, run, run_suite, table

__all__ = ["SCALES", "Comparison", "SuiteResult", "main", "markdown", "run", "run_suite",
           "table"]
