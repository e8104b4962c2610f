//! vmreplica applier: receives cycles and keeps replicas with recovery points (not yet implemented).
