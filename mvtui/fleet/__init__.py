"""Several mvtui in front of one cluster, sharing operator state through Redis
(`[cluster] redis_url`; README "Running several routers").

`fleet.py` builds one replica's part: `link.py` (the connection, fail-static, reconnects),
`store.py` (the shared overlay: drain, capacity, removals), `sync.py` (following the fleet's
state by pub/sub and periodic full reads; finishing operations whose replica died),
`leases.py` (sleep and wake leases with fencing tokens), `heartbeat.py` (each replica's
requests in flight per server, and the view of the fleet). The layers below know none of
this: they see the protocols `control.shared.SharedOverlay` and `cluster.coordination.Coordinator`.
"""
