"""The request router of the app's Ray Serve replicas (app/replica.py), in a module of its own: Serve
imports it by name in its proxy processes, and it imports Ray, which only `--replicas` needs."""

from __future__ import annotations

import random

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter


class AffinityRouter(ConsistentHashRouter):
    """A request with a session id (the `x-session-id` header) goes to its replica on Serve's hash ring
    (after it, the ring's next ones if that one refuses); one without goes to the less busy of two
    replicas picked at random, where Serve's own router would spread it uniformly."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is not None and pending_request.metadata.session_id:
            return await super().choose_replicas(candidate_replicas, pending_request)
        if not candidate_replicas:
            return []
        # One rank of two: Serve takes the one with fewer ongoing requests.
        return [random.sample(list(candidate_replicas), min(2, len(candidate_replicas)))]
