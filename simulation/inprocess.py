"""A Flower ``Grid`` that runs real ClientApp handlers in this process: no SuperLink, no Ray.

For tests and quick experiments (``benchmarks/compare_runs.py``); a run through
it gives the same results as ``flwr run`` with the same config (same seeds).

Each node has its own ``Context`` (node config with partition-id / num-partitions,
as the simulation engine gives, plus a site's own keys from ``sites``, by partition id).
A handler that raises answers with an error reply, as Flower's runtime does. ``tamper``
maps a node id to a function that rewrites that node's replies, to play a faulty or
malicious node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


def act_as_server() -> None:
    """Messages take their run and sender from the process identity Flower sets up."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1


class InProcessGrid(Grid):
    def __init__(self, app: ClientApp, run_config: dict, num_nodes: int,
                 tamper: dict[int, Callable[[Message], Message]] | None = None,
                 sites: dict[int, dict] | None = None) -> None:
        act_as_server()
        self.app = app
        self.contexts = {
            1000 + p: Context(run_id=1, node_id=1000 + p,
                              node_config={"partition-id": p, "num-partitions": num_nodes, **(sites or {}).get(p, {})},
                              state=RecordDict(), run_config=dict(run_config))
            for p in range(num_nodes)
        }
        self.tamper = tamper or {}
        self._replies: dict[str, Message] = {}
        self.pushed: list[Message] = []

    def set_run(self, run) -> None:  # noqa: D102 - not needed in-process
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.pushed.append(message)
            node = message.metadata.dst_node_id
            try:
                reply = self.app(message, self.contexts[node])
            except Exception as ex:  # the reason as Flower's runtime words it (run_clientapp.py)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"),
                                reply_to=message)
            if node in self.tamper:
                reply = self.tamper[node](reply)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies in the order their messages were pushed (as if nodes answered in turn)."""
        wanted = set(message_ids)
        ready = [i for i in self._replies if i in wanted]
        return [self._replies.pop(i) for i in ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
