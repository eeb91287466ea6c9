"""The server's side of a round: from packed signs to a model step.

- :mod:`~dpsign_fl.vote.packing`: the wire format of a payload (one bit per
  coordinate) and its checks; the clients pack with it too.
- :mod:`~dpsign_fl.vote.counter`: :class:`VoteCounter`, :func:`majority_vote`
  and :func:`vote_counts`, counted on the packed bits in ``O(d)`` memory.
- :mod:`~dpsign_fl.vote.kernel`: the compiled inner loop of the counter and of
  the robust filters (numpy fallback with the same counts).
- :mod:`~dpsign_fl.vote.robust`: :func:`robust_vote`, the rule choice
  (:data:`VOTE_RULES`, :data:`DEFAULT_VOTE`).
- :mod:`~dpsign_fl.vote.server_update`: the step ``w <- w - lr * vote``
  (schedule, automatic steps, momentum).
- :mod:`~dpsign_fl.vote.model_sync`: the downlink replay, a client rebuilding
  the model from the votes it was sent.

All of it is post-processing of the clients' releases: no privacy cost.
"""

from .counter import VoteCounter, majority_vote, vote_counts
from .robust import DEFAULT_VOTE, VOTE_RULES, RobustVote, VoteMemory, check_vote_rule, robust_vote

__all__ = [
    "DEFAULT_VOTE", "VOTE_RULES", "RobustVote", "VoteCounter", "VoteMemory", "check_vote_rule", "majority_vote", "robust_vote", "vote_counts",
]
