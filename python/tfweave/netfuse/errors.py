"""Errors a merge raises: each names the member model, the node and what to do."""

from __future__ import annotations


class MergeError(ValueError):
    """The models cannot be merged (base class)."""


class NotIsomorphicError(MergeError):
    """The member graphs differ in more than their weights.

    ``differences`` lists one plain sentence per difference found (node, op, attribute, shape).
    """

    def __init__(self, message: str, differences: list[str]):
        self.differences = list(differences)
        shown = "\n  - ".join(self.differences[:20])
        more = "" if len(self.differences) <= 20 else f"\n  ... and {len(self.differences) - 20} more"
        super().__init__(f"{message}:\n  - {shown}{more}")


class UnsupportedOpError(MergeError):
    """A node whose op has no merge rule consumes a per-model tensor."""

    def __init__(self, op: str, node: str, reason: str = ""):
        self.op = op
        self.node = node
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"cannot merge node '{node}' (op {op}){detail}. NetFuse lifts only the ops it has "
            f"rules for (see tfweave.netfuse.supported_ops()); export the model without this op "
            f"or file an issue with the op name.")
