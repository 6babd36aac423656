"""Evaluation: ``oprd eval`` and ``oprd report`` (see docs/eval.md).

Modules, in pipeline order: ``targets`` (problems, models, sampling settings), ``responses`` (sampled or
read from a file), ``extract`` (the final answer), ``grade`` (equal to the reference?), ``metrics``
(``evaluate_responses``: graded samples -> report dict), ``report`` (write and print one report),
``command`` (``oprd eval``), ``compare`` (``oprd report``: tables and plots over reports).
"""

from oprd_cli.eval.command import evaluate_model, evaluate_target, run_eval
from oprd_cli.eval.extract import (
    DEFAULT_EXTRACT,
    EXTRACT_MODES,
    check_extract_mode,
    extract_answer,
    normalize_answer,
    parse_number,
    vote_key,
)
from oprd_cli.eval.grade import DEFAULT_TIMEOUT_S, Grade, Grader, float_rounding, math_verify_equal, quick_compare
from oprd_cli.eval.metrics import dist_n, distinct_ngrams, evaluate_responses, k_values, majority_vote, pass_at_k
from oprd_cli.eval.report import (
    REPORT_VERSION,
    default_report_path,
    print_report,
    responses_path_for,
    summary,
    write_report,
)
from oprd_cli.eval.responses import load_responses_file, sample_responses
from oprd_cli.eval.targets import (
    EVAL_SAMPLING_DEFAULTS,
    EvalData,
    EvalTarget,
    checkpoint_info,
    eval_sampling,
    existing_report,
    load_eval_data,
    parse_checkpoint_name,
    resolve_targets,
    same_protocol,
    validate_num_samples,
)

__all__ = [
    "DEFAULT_EXTRACT",
    "DEFAULT_TIMEOUT_S",
    "EVAL_SAMPLING_DEFAULTS",
    "EXTRACT_MODES",
    "REPORT_VERSION",
    "EvalData",
    "EvalTarget",
    "Grade",
    "Grader",
    "check_extract_mode",
    "checkpoint_info",
    "default_report_path",
    "dist_n",
    "distinct_ngrams",
    "evaluate_responses",
    "evaluate_model",
    "evaluate_target",
    "existing_report",
    "eval_sampling",
    "extract_answer",
    "float_rounding",
    "k_values",
    "load_eval_data",
    "load_responses_file",
    "majority_vote",
    "math_verify_equal",
    "normalize_answer",
    "parse_number",
    "parse_checkpoint_name",
    "pass_at_k",
    "print_report",
    "quick_compare",
    "resolve_targets",
    "responses_path_for",
    "run_eval",
    "same_protocol",
    "sample_responses",
    "summary",
    "validate_num_samples",
    "vote_key",
    "write_report",
]
