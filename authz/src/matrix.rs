//! `ward policy matrix`: who may connect to whom among a list of workloads,
//! and a tenant-isolation report.

use std::net::IpAddr;

use ward_spec::SpiffeId;

use crate::authorizer::{Authorizer, ConnectContext};
use crate::template::IdTemplate;

/// One allowed pair, on one port.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub principal: SpiffeId,
    pub resource: SpiffeId,
    pub port: u16,
    pub policies: Vec<String>,
    pub cross_tenant: bool,
    /// For a cross-tenant pair: an annotated exception policy is among the determining ones.
    pub covered_by_exception: bool,
}

#[derive(Debug, Default)]
pub struct Matrix {
    pub workloads: Vec<SpiffeId>,
    /// allowed[i][j]: workloads[i] may connect to workloads[j] on some port.
    pub allowed: Vec<Vec<bool>>,
    /// Every allowed (pair, port): each port is decided on its own, so an
    /// exception covering one port does not cover another.
    pub pairs: Vec<Allowed>,
}

impl Matrix {
    /// Cross-tenant allows not covered by an annotated exception.
    pub fn violations(&self) -> impl Iterator<Item = &Allowed> {
        self.pairs
            .iter()
            .filter(|a| a.cross_tenant && !a.covered_by_exception)
    }
}

/// Parses a workloads file: one SPIFFE ID per line; `#` starts a comment.
pub fn parse_workloads(text: &str) -> Result<Vec<SpiffeId>, String> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| SpiffeId::parse(l).map_err(|e| format!("line {}: {l:?}: {e}", i + 1)))
        .collect()
}

/// Evaluates every ordered pair (not a workload to itself) on each port.
pub fn compute(authz: &Authorizer, workloads: &[SpiffeId], ports: &[u16]) -> Matrix {
    let exceptions = authz.exception_ids();
    let n = workloads.len();
    let mut m = Matrix {
        workloads: workloads.to_vec(),
        allowed: vec![vec![false; n]; n],
        pairs: Vec::new(),
    };
    for (i, p) in workloads.iter().enumerate() {
        for (j, r) in workloads.iter().enumerate() {
            if i == j {
                continue;
            }
            for &port in ports {
                let d = authz.decide_connect(
                    p,
                    r,
                    &ConnectContext {
                        destination_port: port,
                        source_address: IpAddr::from([127, 0, 0, 1]),
                        at: None,
                    },
                );
                if d.allowed {
                    m.allowed[i][j] = true;
                    // Tenants as the authorizer sees them: a workload of a
                    // federated trust domain is in none of ours.
                    let (pe, re) = authz.connect_entities(p, r);
                    let (tp, tr) = (pe.tenant, re.tenant);
                    let cross = tp.is_none() || tr.is_none() || tp != tr;
                    m.pairs.push(Allowed {
                        principal: p.clone(),
                        resource: r.clone(),
                        port,
                        covered_by_exception: d.policies.iter().any(|id| exceptions.contains(id)),
                        policies: d.policies,
                        cross_tenant: cross,
                    });
                }
            }
        }
    }
    m
}

/// A short label for a workload: `tenant/namespace/service`, or the full ID.
pub fn label(template: &IdTemplate, id: &SpiffeId) -> String {
    match template.read(id) {
        Some(p) if p.namespace.is_empty() => format!("{}/{}", p.tenant, p.service),
        Some(p) => format!("{}/{}/{}", p.tenant, p.namespace, p.service),
        None => id.to_string(),
    }
}

/// The matrix as text: rows connect to columns; `✓` allowed, `·` denied.
pub fn render(m: &Matrix, template: &IdTemplate) -> String {
    let labels: Vec<String> = m.workloads.iter().map(|w| label(template, w)).collect();
    let width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!("{:width$}  may connect to →\n", "from ↓"));
    for (i, l) in labels.iter().enumerate() {
        out.push_str(&format!("{l:width$}  "));
        for j in 0..labels.len() {
            out.push_str(if i == j {
                " -"
            } else if m.allowed[i][j] {
                " ✓"
            } else {
                " ·"
            });
        }
        out.push('\n');
    }
    out.push_str("\ncolumns: ");
    out.push_str(
        &labels
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}={l}", i + 1))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push('\n');
    out
}
