//! Ward's node agent.
//!
//! Not built yet. The agent will attest to the CA with a join token (node API,
//! `ward-spec`'s `node.v1`), keep its node SVID renewed, sync the registration
//! entries parented to it, generate workload keys locally and have the CA sign
//! them in batches, then serve the resulting SVIDs over the SPIFFE Workload API
//! on a Unix socket, matching callers by their `SO_PEERCRED` selectors.
#![forbid(unsafe_code)]
