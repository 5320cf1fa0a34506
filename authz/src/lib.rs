//! Ward's authorizer.
//!
//! Not built yet. It will turn a verified peer SPIFFE ID into Cedar entities
//! (workload, tenant, namespace, service) through the trust domain's ID
//! template, evaluate the active policy set (swapped atomically, validated
//! against `policies/ward.cedarschema` before it becomes active) and log each
//! decision as one JSON line. The proxy calls it per stream, the CA per admin call.
#![forbid(unsafe_code)]
