"""The cluster: membership and heartbeats, the replication channel and its wire format,
and the choice of a secondary by rank."""
