"""aurora-lite storage node: a durable quorum member that stores a PG's log and pages."""
