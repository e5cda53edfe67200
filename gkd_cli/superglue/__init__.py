"""SuperGLUE evaluation: readers, prompts, log-likelihood scoring, official metrics, results.

The model runtime is not here: anything implementing :class:`LogLikelihoodModel` can be scored.
Typical use::

    from gkd_cli.superglue import evaluate_tasks, save_results, render_results
    results = evaluate_tasks(data_dir, ["BoolQ", "CB"], model, tokenizer.encode, shots=0)
    save_results("out/superglue.json", results, model="student")
    rich.print(render_results(results))
"""

from gkd_cli.superglue.distill_data import TaskText, iter_task_records, iter_task_texts
from gkd_cli.superglue.evaluator import (
    ExampleRecord,
    LogLikelihoodModel,
    ScriptedModel,
    TaskResult,
    evaluate,
    evaluate_tasks,
    limit_examples,
    split_continuations,
)
from gkd_cli.superglue.examples import (
    BoolQExample,
    CBExample,
    COPAExample,
    DiagnosticExample,
    EntitySpan,
    Example,
    MultiRCExample,
    ReCoRDExample,
    RTEExample,
    WiCExample,
    WSCExample,
)
from gkd_cli.superglue.metrics import superglue_average, task_score
from gkd_cli.superglue.prompts import Prompt, verbalizer_tokens
from gkd_cli.superglue.readers import (
    SPLITS,
    SuperGlueDataError,
    available_splits,
    read_boolq,
    read_cb,
    read_copa,
    read_diagnostic,
    read_multirc,
    read_record,
    read_rte,
    read_task,
    read_wic,
    read_wsc,
    task_path,
)
from gkd_cli.superglue.results import (
    CompareRow,
    compare,
    load_results,
    render_compare,
    render_results,
    results_to_json,
    save_results,
)
from gkd_cli.superglue.tasks import BENCHMARK_TASKS, TASKS, TaskSpec, get_task

__all__ = [
    "BENCHMARK_TASKS",
    "SPLITS",
    "TASKS",
    "BoolQExample",
    "CBExample",
    "COPAExample",
    "CompareRow",
    "DiagnosticExample",
    "EntitySpan",
    "Example",
    "ExampleRecord",
    "LogLikelihoodModel",
    "MultiRCExample",
    "Prompt",
    "RTEExample",
    "ReCoRDExample",
    "ScriptedModel",
    "SuperGlueDataError",
    "TaskResult",
    "TaskSpec",
    "TaskText",
    "WSCExample",
    "WiCExample",
    "available_splits",
    "compare",
    "evaluate",
    "evaluate_tasks",
    "get_task",
    "iter_task_records",
    "iter_task_texts",
    "limit_examples",
    "load_results",
    "read_boolq",
    "read_cb",
    "read_copa",
    "read_diagnostic",
    "read_multirc",
    "read_record",
    "read_rte",
    "read_task",
    "read_wic",
    "read_wsc",
    "render_compare",
    "render_results",
    "results_to_json",
    "save_results",
    "split_continuations",
    "superglue_average",
    "task_path",
    "task_score",
    "verbalizer_tokens",
]
