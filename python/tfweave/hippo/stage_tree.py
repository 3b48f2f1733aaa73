"""The stage tree: trials whose hyper-parameter sequences share a prefix share its training.

A *node* is a training state: the model after training, from a freshly built model, through a
sequence of per-epoch configurations up to epoch ``end``. Its id hashes exactly that (the root's
constant hyper-parameters, then one configuration per epoch), so two trials reach the same node
exactly when their training up to that epoch is the same computation, however the tree happens to
be cut into stages. The edge into a node is a *stage*: ``config`` held from ``start`` to ``end``.
Roots (``end == 0``) stand for a freshly built model, one per set of constant hyper-parameters.

A trial is a path of segments ``(config, start, end)``; ``add_path`` grafts it onto the tree,
descending shared stages and forking a stage where a trial stops or diverges inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterable

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"


def config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _chain(node_id: str, config: dict, epochs: int) -> str:
    key = config_key(config)
    for _ in range(epochs):
        node_id = hashlib.sha256(f"{node_id}|{key}".encode()).hexdigest()[:16]
    return node_id


@dataclasses.dataclass
class StageNode:
    id: str
    parent: str | None
    start: int
    end: int
    config: dict
    status: str = PENDING
    children: list = dataclasses.field(default_factory=list)
    # Filled by execution.
    trial_id: str | None = None  # the KerasTuner trial that produced this state last
    checkpoint: str | None = None  # path of the saved state while it exists
    history: dict = dataclasses.field(default_factory=dict)  # epoch (0-based) -> metrics
    steps: int = 0  # training steps of one execution of this stage
    seconds: float = 0.0  # wall time of its last execution (critical-path estimates)
    runs: int = 0  # executions that completed (more than 1 means a rerun)
    message: str | None = None

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["history"] = {str(k): v for k, v in self.history.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "StageNode":
        data = dict(data)
        data["history"] = {int(k): v for k, v in data.get("history", {}).items()}
        return cls(**data)


class StageTree:
    """Stages of all trials of a study, merged where their prefixes agree."""

    def __init__(self):
        self.nodes: dict[str, StageNode] = {}

    # --- building -------------------------------------------------------------------------
    def root_for(self, constants: dict) -> StageNode:
        root_id = "r" + hashlib.sha256(config_key(constants).encode()).hexdigest()[:15]
        if root_id not in self.nodes:
            self.nodes[root_id] = StageNode(root_id, None, 0, 0, dict(constants), status=DONE)
        return self.nodes[root_id]

    def add_path(self, constants: dict, segments: Iterable[tuple[dict, int, int]]) -> str:
        """Grafts a trial's path onto the tree; returns the id of the node where it ends."""
        node = self.root_for(constants)
        for config, start, end in segments:
            if start != node.end:
                raise ValueError(f"path segments must be contiguous: segment starts at {start}, "
                                 f"previous one ends at {node.end}")
            while node.end < end:
                child = self._child_with_config(node, config)
                if child is None:
                    node = self._new_child(node, config, end)
                elif child.end <= end:
                    node = child
                else:
                    node = self.fork_at(child.id, end)
        return node.id

    def existing_along(self, constants: dict, segments: Iterable[tuple[dict, int, int]]) -> list:
        """Ids of the nodes a path would pass through, as far as the tree already has them."""
        node = self.root_for(constants)
        out = [node.id]
        for config, _, end in segments:
            while node.end < end:
                child = self._child_with_config(node, config)
                if child is None or child.end > end:
                    return out
                node = child
                out.append(node.id)
        return out

    def fork_at(self, node_id: str, epoch: int) -> StageNode:
        """Cuts the stage into ``node_id`` at ``epoch``; returns the new node there.

        The node keeps its id (its training is unchanged) and becomes the child of the new one.
        """
        node = self.nodes[node_id]
        parent = self.nodes[node.parent]
        if not node.start < epoch < node.end:
            raise ValueError(f"cannot fork stage {node_id} [{node.start}, {node.end}) at {epoch}")
        middle = StageNode(_chain(parent.id, node.config, epoch - node.start), parent.id,
                           node.start, epoch, dict(node.config))
        # A state already trained past the fork has its metrics up to the fork; its checkpoint
        # at the fork was never written, so the middle stage still has to run when needed.
        middle.history = {e: m for e, m in node.history.items() if e < epoch}
        node.history = {e: m for e, m in node.history.items() if e >= epoch}
        if node.steps:  # one configuration holds on the whole stage: steps per epoch are equal
            middle.steps = node.steps * (epoch - node.start) // node.length
            node.steps -= middle.steps
            middle.seconds = node.seconds * (epoch - node.start) / node.length
            node.seconds -= middle.seconds
        self.nodes[middle.id] = middle
        parent.children[parent.children.index(node_id)] = middle.id
        middle.children.append(node_id)
        node.parent, node.start = middle.id, epoch
        return middle

    def _child_with_config(self, node: StageNode, config: dict) -> StageNode | None:
        key = config_key(config)
        for child_id in node.children:
            child = self.nodes[child_id]
            if config_key(child.config) == key:
                return child
        return None

    def _new_child(self, node: StageNode, config: dict, end: int) -> StageNode:
        child = StageNode(_chain(node.id, config, end - node.end), node.id, node.end, end,
                          dict(config))
        self.nodes[child.id] = child
        node.children.append(child.id)
        return child

    # --- queries ----------------------------------------------------------------------------
    def path(self, node_id: str) -> list[StageNode]:
        """Nodes from the root to ``node_id``, root first."""
        nodes = []
        node = self.nodes[node_id]
        while node is not None:
            nodes.append(node)
            node = self.nodes[node.parent] if node.parent else None
        return nodes[::-1]

    def root_of(self, node_id: str) -> StageNode:
        return self.path(node_id)[0]

    def has_state(self, node: StageNode) -> bool:
        """Whether training can start from this node (a root, or a saved checkpoint)."""
        return node.is_root or (node.status == DONE and node.checkpoint is not None)

    def ready(self) -> list[StageNode]:
        """Pending stages whose starting state is available."""
        return [n for n in self.nodes.values() if n.status == PENDING and n.parent is not None
                and self.has_state(self.nodes[n.parent])]

    def descendants(self, node_id: str) -> list[StageNode]:
        out, stack = [], list(self.nodes[node_id].children)
        while stack:
            node = self.nodes[stack.pop()]
            out.append(node)
            stack.extend(node.children)
        return out

    def history_along(self, node_id: str) -> dict[int, dict]:
        history = {}
        for node in self.path(node_id):
            history.update(node.history)
        return history

    # --- accounting -------------------------------------------------------------------------
    def unique_epochs(self) -> int:
        """Epochs of distinct training the study has done (each shared stage counted once)."""
        return sum(n.length for n in self.nodes.values() if n.steps)

    def unique_steps(self) -> int:
        return sum(n.steps for n in self.nodes.values())

    def steps_along(self, node_id: str) -> int:
        return sum(n.steps for n in self.path(node_id))

    def epochs_along(self, node_id: str) -> int:
        return self.nodes[node_id].end

    # --- state --------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"format": "tfweave.hippo.stage_tree/1",
                "nodes": [n.to_dict() for n in self.nodes.values()]}

    def set_state(self, state: dict) -> None:
        if state.get("format") != "tfweave.hippo.stage_tree/1":
            raise ValueError(f"not a stage tree state (format {state.get('format')!r})")
        self.nodes = {d["id"]: StageNode.from_dict(d) for d in state["nodes"]}

    @classmethod
    def from_state(cls, state: dict) -> "StageTree":
        tree = cls()
        tree.set_state(state)
        return tree

    def save(self, path: str) -> None:
        from tfweave.hippo import storage
        storage.atomic_write_json(path, self.get_state())

    @classmethod
    def load(cls, path: str) -> "StageTree":
        from tfweave.hippo import storage
        return cls.from_state(storage.read_json(path))
