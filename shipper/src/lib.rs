//! vmreplica shipper: sends frozen generations to the replica site (not yet implemented).
