"""Benchmarks for language models: multiple-choice and last-word tasks scored by log-likelihood.

`evaluate_tasks(model, tokenizer, ["hellaswag", "mmlu"], shots=0)` runs tasks the way
lm-evaluation-harness does (`tasks.py`: the prompts; `scoring.py`: log-likelihoods with a
shared KV cache per context; `harness.py`: shots, metrics, standard errors), and
`write_eval` / `compare_table` / `plot_report` (`report.py`) keep and compare the results.
"""

from gptforge.evaluation.harness import EvalRun, MetricResult, evaluate_tasks, fewshot_prompts
from gptforge.evaluation.report import compare_table, format_table, plot_report, read_eval, write_eval
from gptforge.evaluation.scoring import Score, encode_pair, score_requests
from gptforge.evaluation.tasks import TASK_NAMES, Item, TaskData, load_task

__all__ = [
    "TASK_NAMES", "EvalRun", "Item", "MetricResult", "Score", "TaskData", "compare_table", "encode_pair",
    "evaluate_tasks", "fewshot_prompts", "format_table", "load_task", "plot_report", "read_eval",
    "score_requests", "write_eval",
]
