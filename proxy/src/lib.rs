//! Ward's tunneling sidecar.
//!
//! Not built yet. It will take its SVID and bundles from the Workload API,
//! carry application TCP streams as HTTP/2 CONNECT tunnels over mutual TLS 1.3
//! (HBONE, inbound port 15008), and ask the authorizer before it connects any
//! inbound stream to the local application.
#![forbid(unsafe_code)]
