//! Decision latency: `ward-authz` (entities built from the two SPIFFE IDs per
//! request, exception pre-check, the guard, fail-closed) against raw
//! `cedar_policy::Authorizer::is_authorized` on the same requests with the
//! entities built beforehand, same run.
//!
//! Policy sets of 10, 1,000 and 10,000 policies: the tenant-isolation guard
//! plus same-tenant service pairs spread over 100 tenants; 10,000 distinct
//! workloads (100 tenants × 100 services); 20,000 requests (90 % same-tenant;
//! 2,000 for the 10,000-policy set, where raw Cedar takes milliseconds each).
//! Each decision is timed on its own; p50 and p99 are reported.
//!
//! Run: `cargo bench -p ward-authz --bench decisions` (`WARD_BENCH_POLICIES=1000` for one size)

use std::collections::HashSet;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Instant;

use cedar_policy::{
    Context, Entities, Entity, EntityUid, PolicySet, Request, RestrictedExpression,
};
use ward_authz::policy::{compile, parse_schema, SourceFile};
use ward_authz::{Authorizer, ConnectContext, IdTemplate, Mode};
use ward_spec::SpiffeId;

const TENANTS: usize = 100;
const SERVICES: usize = 100;

fn policies(n: usize) -> String {
    let mut s = String::from(include_str!("../../policies/tenant-isolation.cedar"));
    for i in 0..n.saturating_sub(1) {
        let t = i % TENANTS;
        let (a, b) = ((i / TENANTS) % SERVICES, (i / TENANTS + 1) % SERVICES);
        s.push_str(&format!(
            "\n@id(\"p{i}\")\npermit (principal is Ward::Workload in Ward::Tenant::\"t{t}\", action == Ward::Action::\"connect\", resource is Ward::Workload in Ward::Tenant::\"t{t}\")\n  when {{ principal.service == \"s{a}\" && resource.service == \"s{b}\" }};\n"
        ));
    }
    s
}

fn workload(i: usize) -> SpiffeId {
    SpiffeId::parse(&format!(
        "spiffe://example.org/tenant/t{}/ns/prod/sa/s{}",
        i % TENANTS,
        (i / TENANTS) % SERVICES
    ))
    .unwrap()
}

/// Deterministic pseudo-random numbers (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn raw_entities(authz: &Authorizer, p: &SpiffeId, r: &SpiffeId) -> Entities {
    let mut e = authz.workload_entities(p).entities;
    let re = authz.workload_entities(r).entities;
    let seen: HashSet<EntityUid> = e.iter().map(|x| x.uid()).collect();
    e.extend(re.into_iter().filter(|x: &Entity| !seen.contains(&x.uid())));
    Entities::from_entities(e, None).unwrap()
}

fn main() {
    let schema = parse_schema(
        "ward.cedarschema",
        include_str!("../../policies/ward.cedarschema"),
    )
    .unwrap();
    let workloads: Vec<SpiffeId> = (0..TENANTS * SERVICES).map(workload).collect();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let requests: Vec<(usize, usize)> = (0..20_000)
        .map(|_| {
            let p = rng.next() % workloads.len();
            let r = if rng.next().is_multiple_of(10) {
                rng.next() % workloads.len()
            } else {
                // same tenant: same i % TENANTS
                (p % TENANTS) + TENANTS * (rng.next() % SERVICES)
            };
            (p, r)
        })
        .collect();
    let ctx = ConnectContext {
        destination_port: 8080,
        source_address: IpAddr::from([10, 0, 0, 1]),
        // The same `now` as the raw requests below.
        at: Some(1_800_000_000),
    };
    println!("| policies | ward p50 | ward p99 | raw Cedar p50 | raw Cedar p99 | ward/raw p50 | allowed |");
    println!("|---|---|---|---|---|---|---|");
    // `WARD_BENCH_POLICIES=10,1000` runs only those sizes.
    let sizes: Vec<usize> = std::env::var("WARD_BENCH_POLICIES")
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("a policy count"))
                .collect()
        })
        .unwrap_or_else(|_| vec![10, 1_000, 10_000]);
    for n in sizes {
        // Raw Cedar scans every policy: keep the largest run short.
        let requests = if n > 1_000 {
            &requests[..2_000]
        } else {
            &requests[..]
        };
        let text = policies(n);
        let compiled = compile(
            &[SourceFile {
                name: "bench.cedar".into(),
                text: text.clone(),
            }],
            &schema,
        )
        .unwrap();
        let set: PolicySet = compiled.all.clone();
        let authz = Authorizer::new(schema.clone(), IdTemplate::default(), Mode::Enforce, None);
        authz.install(compiled);

        // Raw Cedar: requests and entities prepared outside the timed section.
        let action = EntityUid::from_str(r#"Ward::Action::"connect""#).unwrap();
        let raw: Vec<(Request, Entities)> = requests
            .iter()
            .map(|&(p, r)| {
                let (pw, rw) = (&workloads[p], &workloads[r]);
                let context = Context::from_pairs([
                    (
                        "destination_port".to_owned(),
                        RestrictedExpression::new_long(8080),
                    ),
                    (
                        "source_address".to_owned(),
                        RestrictedExpression::new_ip("10.0.0.1"),
                    ),
                    (
                        "now".to_owned(),
                        RestrictedExpression::new_long(1_800_000_000),
                    ),
                    // The bench set has no exception policies, so Ward's pre-check is always false.
                    (
                        "cross_tenant_exception".to_owned(),
                        RestrictedExpression::new_bool(false),
                    ),
                ])
                .unwrap();
                let pu = EntityUid::from_str(&format!("Ward::Workload::\"{pw}\"")).unwrap();
                let ru = EntityUid::from_str(&format!("Ward::Workload::\"{rw}\"")).unwrap();
                (
                    Request::new(pu, action.clone(), ru, context, None).unwrap(),
                    raw_entities(&authz, pw, rw),
                )
            })
            .collect();
        let cedar = cedar_policy::Authorizer::new();
        // Warm up both.
        for (req, ents) in raw.iter().take(200) {
            std::hint::black_box(cedar.is_authorized(req, &set, ents));
        }
        for &(p, r) in requests.iter().take(200) {
            std::hint::black_box(authz.decide_connect(&workloads[p], &workloads[r], &ctx));
        }
        let mut raw_t = Vec::with_capacity(raw.len());
        let mut raw_allowed = 0;
        for (req, ents) in &raw {
            let t = Instant::now();
            let resp = cedar.is_authorized(req, &set, ents);
            raw_t.push(t.elapsed().as_secs_f64() * 1e6);
            raw_allowed += (resp.decision() == cedar_policy::Decision::Allow) as usize;
        }
        let mut ward_t = Vec::with_capacity(requests.len());
        let mut allowed = 0;
        for &(p, r) in requests {
            let t = Instant::now();
            let d = authz.decide_connect(&workloads[p], &workloads[r], &ctx);
            ward_t.push(t.elapsed().as_secs_f64() * 1e6);
            allowed += d.allowed as usize;
        }
        assert_eq!(allowed, raw_allowed, "ward and raw Cedar must agree");
        let (w50, w99, r50, r99) = (
            pct(&mut ward_t, 0.5),
            pct(&mut ward_t, 0.99),
            pct(&mut raw_t, 0.5),
            pct(&mut raw_t, 0.99),
        );
        println!("| {n} | {w50:.1} µs | {w99:.1} µs | {r50:.1} µs | {r99:.1} µs | {:.2} | {allowed} of {} |", w50 / r50, requests.len());
    }
}
