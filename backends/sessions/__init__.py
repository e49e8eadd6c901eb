"""Sessions: the object the application holds, the local store of primaries and replicas,
and the manager that opens, commits, replicates, hands over and expires them."""
