"""A stage store: finished stages shared across studies (and with later ones) on a gfile path.

A stage-tree node id hashes the root's constant hyper-parameters and the configuration of every
epoch up to the node, so two studies over the same model, data and search space that reach the
same id have trained the same state. Each finished stage is published as ``stage_<id>.json`` (its
per-epoch metrics, steps, seconds and checkpoint path) beside its checkpoint; a study that needs a
stage already in the store adopts it instead of training it. Records and checkpoints are written
atomically and never removed by a study's checkpoint collection.

``manifest.json`` pins what the ids do not cover (the search space and the seed): a study with
another space or seed is refused instead of silently reusing states that do not fit it.
"""

from __future__ import annotations

import logging
import os

from tfweave.hippo import storage

LOG = logging.getLogger("tfweave.hippo")


class StageStore:
    def __init__(self, directory: str):
        self.directory = str(directory)
        self._checked = False

    def check(self, space_fingerprint, seed) -> None:
        """Creates the manifest, or refuses a study whose space or seed differ from it."""
        if self._checked:
            return
        storage.makedirs(self.directory)
        path = os.path.join(self.directory, "manifest.json")
        mine = {"format": "tfweave.hippo.stage_store/1", "space_fingerprint": space_fingerprint,
                "seed": int(seed)}
        if storage.exists(path):
            theirs = storage.read_json(path)
            if theirs.get("space_fingerprint") != space_fingerprint or \
                    theirs.get("seed") != int(seed):
                raise ValueError(
                    f"stage store {self.directory} holds stages of another study setup (search "
                    f"space or seed differ: seed {theirs.get('seed')} there, {seed} here); its "
                    f"states do not fit this study. Use another stage_store directory")
        else:
            storage.atomic_write_json(path, mine)
        self._checked = True

    def checkpoint_path(self, node_id: str) -> str:
        return os.path.join(self.directory, f"stage_{node_id}.ckpt")

    def _record_path(self, node_id: str) -> str:
        return os.path.join(self.directory, f"stage_{node_id}.json")

    def lookup(self, node_id: str) -> dict | None:
        """The finished stage's record, if its checkpoint is still there."""
        path = self._record_path(node_id)
        if not storage.exists(path):
            return None
        try:
            record = storage.read_json(path)
        except ValueError:
            LOG.warning("stage store record %s is unreadable; the stage will be trained", path)
            return None
        if not record.get("checkpoint") or not storage.exists(record["checkpoint"]):
            return None
        record["history"] = {int(k): v for k, v in record.get("history", {}).items()}
        return record

    def publish(self, node) -> None:
        storage.atomic_write_json(self._record_path(node.id), {
            "id": node.id, "start": node.start, "end": node.end, "config": node.config,
            "history": {str(k): v for k, v in node.history.items()}, "steps": node.steps,
            "seconds": node.seconds, "checkpoint": node.checkpoint})
