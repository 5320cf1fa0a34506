//! Generated code for `proto/ward/**` (node and admin APIs, shared types).

#![allow(clippy::all, missing_docs)]

pub mod types {
    pub mod v1 {
        tonic::include_proto!("ward.types.v1");
    }
}

pub mod node {
    pub mod v1 {
        tonic::include_proto!("ward.node.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("ward.admin.v1");
    }
}

/// The agent's own services beside the Workload API (policy distribution).
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("ward.agent.v1");
    }
}

/// The SPIFFE Workload API (no proto package: service `SpiffeWorkloadAPI`).
pub mod workload {
    tonic::include_proto!("_");
}
