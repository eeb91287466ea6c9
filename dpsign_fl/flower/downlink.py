"""The server side of the downlink: which model each node holds, and what to send it.

With ``mode="votes"`` (the default of :class:`~dpsign_fl.flower.strategy.SignMajorityVote`)
a node that holds the model of round s is sent the packed votes of the rounds
since then (at most 1.6 bits per coordinate each) when that is smaller than the
full model, else the full model; every instruction names the digest of the
model the node must reach (:mod:`dpsign_fl.vote.model_sync`). A node that turns out
not to hold the model the votes apply to answers :data:`OUT_OF_SYNC_CODE` and is
sent the full model in the same round. With ``mode="weights"`` every node gets
the full model every round, for clients that do not keep a replica.

What the server assumes a node holds is only a guess that saves bytes: the
client checks every digest, so a wrong guess costs one resend, never a wrong
model.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..vote.model_sync import UpdateRule, state_digest
from ..vote.packing import pack_vote
from .records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    OUT_OF_SYNC_CODE,
    ROUND_KEY,
    full_model_content,
    instruction_config,
    votes_content,
)

DOWNLINK_MODES = ("votes", "weights")


class Downlink:
    """Tracks the votes of recent rounds and, per node, the round whose model it holds.

    Args:
        mode: ``"votes"`` or ``"weights"``.
        trainable: the names of the arrays the votes move.
        rule: the server's update rule (sent with every instruction).
    """

    def __init__(self, mode: str, trainable: tuple[str, ...], rule: UpdateRule) -> None:
        if mode not in DOWNLINK_MODES:
            raise ValueError(f"downlink must be one of {DOWNLINK_MODES}, got {mode!r}")
        self.mode = mode
        self.trainable = trainable
        self.rule = rule
        self._digests: dict[int, str] = {}  # round -> digest of the model at its start
        self._votes: dict[int, np.ndarray] = {}  # round -> packed vote (rounds that stepped)
        self._holds: dict[int, int] = {}  # node -> round whose starting model it holds

    def begin_round(self, server_round: int, weights: np.ndarray, update_state: np.ndarray | None) -> str:
        """Note the model at the start of ``server_round``; return its digest."""
        digest = state_digest(weights, update_state)
        self._digests[server_round] = digest
        return digest

    def record_vote(self, server_round: int, vote: np.ndarray, full_model_bytes: int) -> None:
        """Keep round ``server_round``'s vote; drop old votes once they outweigh the full model."""
        self._votes[server_round] = pack_vote(vote)
        while sum(v.nbytes for v in self._votes.values()) > full_model_bytes and len(self._votes) > 1:
            del self._votes[min(self._votes)]

    def node_holds(self, node: int, server_round: int) -> None:
        """The node holds the model at the start of ``server_round`` (it replied in that round)."""
        self._holds[node] = server_round

    def forget(self, node: int) -> None:
        """Nothing is known about the node's model any more (no reply, or a bad one)."""
        self._holds.pop(node, None)

    def instruction(
        self,
        node: int,
        server_round: int,
        arrays: ArrayRecord,
        update_state: np.ndarray | None,
        config: ConfigRecord,
        *,
        full: bool = False,
        sync_only: bool = False,
    ) -> tuple[RecordDict, bool]:
        """The content to send ``node`` for ``server_round``, and whether it is the full model."""
        if self.mode == "weights":
            return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({**dict(config), ROUND_KEY: server_round})}), True
        entries = {**dict(config), **instruction_config(
            server_round, digest=self._digests[server_round], rule=self.rule, sync_only=sync_only
        )}
        votes = None if full else self._missed_votes(node, server_round)
        full_bytes = sum(len(a.data) for a in arrays.values()) + (0 if update_state is None else update_state.nbytes)
        if votes is None or sum(v.nbytes for _, v in votes) >= full_bytes:
            return full_model_content(arrays, self.trainable, update_state, entries), True
        return votes_content(votes, self._digests[self._holds[node]], entries), False

    def _missed_votes(self, node: int, server_round: int) -> list[tuple[int, np.ndarray]] | None:
        """The votes from the node's model to ``server_round``'s, or None if they are not all kept."""
        start = self._holds.get(node)
        if start is None or start > server_round or start not in self._digests:
            return None
        missed = [r for r in range(start, server_round) if self._digests.get(r + 1) != self._digests.get(r)]
        if any(r not in self._votes for r in missed):
            return None
        return [(r, self._votes[r]) for r in missed]
