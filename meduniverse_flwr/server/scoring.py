"""Per-task scores of a base from the nodes' evaluate replies: validated, example-weighted per task.

Every task asked gets an entry; one without a valid reply is marked missing, with the reasons, so
that no mean is quietly computed over fewer tasks. Each entry names the split it scored
(``split``) and how many examples (``n_scored``).
"""

from __future__ import annotations

from flwr.app import Message, MetricRecord

from meduniverse_flwr.server.grid_io import reply_records
from meduniverse_flwr.server.validation import EvalScore, Rejected, check_eval_reply
from meduniverse_flwr.wire.card import TaskCard


def reply_score(reply: Message, card: TaskCard | None, eval_split: str) -> EvalScore:
    """The score an evaluate reply carries: its metrics record (``grid_io.reply_records``) checked by
    ``validation.check_eval_reply``; Rejected says why it has none."""
    if card is None:
        raise Rejected("node has no task card")
    [metrics] = reply_records(reply, ("metrics", MetricRecord))
    return check_eval_reply(metrics, card, eval_split)


def task_score(scores: list[EvalScore], problems: list[str], held_out: bool, split: str) -> dict:
    """One task's entry of ``per_task``: example-weighted over its nodes; ``missing`` if none replied well."""
    if not scores:
        return {"accuracy": None, "auc": None, "n_scored": 0, "split": split, "held_out": held_out,
                "missing": "; ".join(problems)}
    n_scored = sum(score.n_scored for score in scores)
    with_auc = [score for score in scores if score.auc is not None]
    auc = (sum(score.auc * score.n_scored for score in with_auc) / sum(score.n_scored for score in with_auc)
           if with_auc else None)
    entry = {"accuracy": sum(score.accuracy * score.n_scored for score in scores) / n_scored, "auc": auc,
             "n_scored": n_scored, "split": split, "held_out": held_out}
    spent = [score.site_epsilon for score in scores if score.site_epsilon is not None]
    if spent:  # sites with a privacy floor: the most any of the task's sites says it has spent
        entry["site_epsilon"] = max(spent)
    return entry
