//! Clients of the CA admin API: tokens, entries, agents, bundle.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;
use ward_spec::proto::admin::v1 as pb;
use ward_spec::proto::admin::v1::admin_client::AdminClient;
use ward_spec::proto::types::v1 as types;
use ward_spec::TrustBundle;

use super::output::{self, entry_human, entry_json, print_json};
use super::{AdminTarget, BundleFormat, Output};

pub async fn client(target: &AdminTarget) -> anyhow::Result<AdminClient<Channel>> {
    if let Some(addr) = &target.ca_address {
        return remote_client(addr, &target.workload_socket).await;
    }
    let ch = ward_spec::grpc::unix_channel(&target.socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the CA admin socket {} (is `ward ca serve` running? pass --socket or set WARD_ADMIN_SOCKET)",
                target.socket.display()
            )
        })?;
    Ok(AdminClient::new(ch))
}

/// The admin API over mutual TLS: this workload's first X509-SVID (fetched
/// from the Workload API) as client certificate; the server must present the
/// CA's own ID (`spiffe://<td>/ward/ca`) under the same bundle.
async fn remote_client(addr: &str, workload_socket: &str) -> anyhow::Result<AdminClient<Channel>> {
    let svid = super::svid::fetch_first(workload_socket).await?;
    let chain = ward_spec::svid::split_der_chain(&svid.x509_svid)?;
    let leaf = ward_spec::svid::check_leaf(chain.first().context("empty SVID chain")?)?;
    let mut bundle = TrustBundle::new(leaf.spiffe_id.trust_domain().clone());
    bundle.x509_authorities = ward_spec::svid::split_der_chain(&svid.bundle)?;
    let roots = ward_spec::tls::RootStore::new(&bundle)?;
    let resolver = ward_spec::tls::SvidResolver::default();
    resolver.set(&chain, &svid.x509_svid_key)?;
    let ca_id = bundle.trust_domain.id("/ward/ca")?;
    let config = ward_spec::tls::client_config(
        Some(resolver),
        ward_spec::tls::SpiffeServerVerifier::new(
            roots,
            ward_spec::tls::PeerPolicy::OneOf(vec![ca_id]),
        ),
    );
    let ch = ward_spec::grpc::tls_channel(addr, std::sync::Arc::new(config))
        .await
        .with_context(|| {
            format!(
                "cannot reach the CA at {addr} over mutual TLS as {}",
                leaf.spiffe_id
            )
        })?;
    Ok(AdminClient::new(ch))
}

/// Every item of a paged listing: `page(token)` asks for one page and
/// returns its items and the next page's token (empty after the last).
pub async fn all_pages<T, F, Fut>(mut page: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await.map_err(status)?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

pub fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a one-time join token for a new agent.
    #[command(
        after_help = "Example:\n  ward token create --ttl 10m\n  WARD_JOIN_TOKEN=$(ward token create --output json | jq -r .token) ward agent run ..."
    )]
    Create {
        /// How long the token stays valid (e.g. 10m, 1h; at most a year). Default: the CA's join_token_ttl.
        #[arg(long, value_parser = ward_ca::config::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// The tenant whose node the token is for (a tenant admin may create
        /// tokens only for its own tenant).
        #[arg(long, default_value = "")]
        tenant: String,
        #[command(flatten)]
        target: AdminTarget,
    },
}

pub async fn token(cmd: TokenCommand, out: Output) -> anyhow::Result<()> {
    let TokenCommand::Create {
        ttl,
        tenant,
        target,
    } = cmd;
    // The CA reads 0 as its default: a shorter TTL would silently be that.
    if let Some(ttl) = ttl.filter(|t| t.as_secs() == 0) {
        anyhow::bail!("--ttl {ttl:?}: a join token lives at least 1 s");
    }
    let mut c = client(&target).await?;
    let r = c
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl: ttl.map(|d| d.as_secs() as i64).unwrap_or(0),
            tenant,
        })
        .await
        .map_err(status)?
        .into_inner();
    match out {
        Output::Json => print_json(&json!({
            "token": r.token, "agent_id": r.agent_id, "expires_at": r.expires_at,
        })),
        Output::Human => println!(
            "Token:    {}\nAgent ID: {}\nExpires:  {}",
            r.token,
            r.agent_id,
            output::time(r.expires_at)
        ),
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EntryFields {
    /// The SPIFFE ID workloads matching this entry receive.
    #[arg(long)]
    spiffe_id: String,
    /// The agent (node SPIFFE ID) whose workloads may receive it.
    #[arg(long)]
    parent_id: String,
    /// A selector the workload must show, e.g. unix:uid:1000 (repeat for several).
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    /// X509-SVID lifetime in seconds (0: the CA default; at most ten years, and never past the CA's own).
    #[arg(long, default_value_t = 0)]
    x509_ttl: i64,
    /// JWT-SVID lifetime in seconds (0: the CA default; at most ten years, and never past the CA's own).
    #[arg(long, default_value_t = 0)]
    jwt_ttl: i64,
    /// A DNS name for the certificate (repeat for several).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// A hint for workloads that receive several SVIDs.
    #[arg(long, default_value = "")]
    hint: String,
    /// Mark the entry as an admin identity.
    #[arg(long)]
    admin: bool,
    /// A trust domain whose bundle the workloads also receive, e.g.
    /// spiffe://partner.org (repeat for several; each needs a federated
    /// bundle, `ward bundle set`).
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
}

impl EntryFields {
    fn into_pb(self, id: String) -> types::Entry {
        types::Entry {
            id,
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors: self
                .selectors
                .into_iter()
                .map(|s| match s.split_once(':') {
                    Some((t, v)) => types::Selector {
                        r#type: t.into(),
                        value: v.into(),
                    },
                    None => types::Selector {
                        r#type: s,
                        value: String::new(),
                    },
                })
                .collect(),
            x509_ttl: self.x509_ttl,
            jwt_ttl: self.jwt_ttl,
            dns_names: self.dns_names,
            hint: self.hint,
            admin: self.admin,
            revision: 0,
            created_at: 0,
            federates_with: self.federates_with,
        }
    }
}

#[derive(Subcommand)]
pub enum EntryCommand {
    /// Register a workload identity.
    #[command(
        after_help = "Example:\n  ward entry create --spiffe-id spiffe://example.org/tenant/acme/ns/prod/sa/web \\\n    --parent-id spiffe://example.org/ward/agent/join_token/4f2a... --selector unix:uid:1000"
    )]
    Create {
        /// Choose the entry ID (default: a random UUID).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List entries, optionally filtered.
    #[command(
        after_help = "Example:\n  ward entry list --parent-id spiffe://example.org/ward/agent/join_token/4f2a...\n  ward entry list --output json"
    )]
    List {
        #[arg(long)]
        parent_id: Option<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Show one entry.
    #[command(after_help = "Example:\n  ward entry show 0b9c1d2e-...")]
    Show {
        id: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Replace an entry's fields (all of them: pass the full entry).
    #[command(
        after_help = "Example:\n  ward entry update 0b9c1d2e-... --spiffe-id spiffe://example.org/web \\\n    --parent-id spiffe://example.org/ward/agent/join_token/4f2a... --selector unix:uid:1001"
    )]
    Update {
        id: String,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Delete an entry.
    #[command(after_help = "Example:\n  ward entry delete 0b9c1d2e-...")]
    Delete {
        id: String,
        #[command(flatten)]
        target: AdminTarget,
    },
}

pub async fn entry(cmd: EntryCommand, out: Output) -> anyhow::Result<()> {
    let show = |e: &types::Entry| match out {
        Output::Json => print_json(&entry_json(e)),
        Output::Human => print!("{}", entry_human(e)),
    };
    match cmd {
        EntryCommand::Create { id, fields, target } => {
            let mut c = client(&target).await?;
            let e = c
                .create_entry(pb::CreateEntryRequest {
                    entry: Some(fields.into_pb(id.unwrap_or_default())),
                })
                .await
                .map_err(status)?
                .into_inner();
            show(&e);
        }
        EntryCommand::Update { id, fields, target } => {
            let mut c = client(&target).await?;
            let e = c
                .update_entry(pb::UpdateEntryRequest {
                    entry: Some(fields.into_pb(id)),
                })
                .await
                .map_err(status)?
                .into_inner();
            show(&e);
        }
        EntryCommand::Show { id, target } => {
            let mut c = client(&target).await?;
            let e = c
                .get_entry(pb::GetEntryRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            show(&e);
        }
        EntryCommand::Delete { id, target } => {
            let mut c = client(&target).await?;
            c.delete_entry(pb::DeleteEntryRequest { id: id.clone() })
                .await
                .map_err(status)?;
            match out {
                Output::Json => print_json(&json!({ "deleted": id })),
                Output::Human => println!("Deleted entry {id}"),
            }
        }
        EntryCommand::List {
            parent_id,
            spiffe_id,
            target,
        } => {
            let c = client(&target).await?;
            let all = all_pages(|page_token| {
                let mut c = c.clone();
                let req = pb::ListEntriesRequest {
                    parent_id: parent_id.clone().unwrap_or_default(),
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    page_token,
                    page_size: 0,
                };
                async move {
                    let r = c.list_entries(req).await?.into_inner();
                    Ok((r.entries, r.next_page_token))
                }
            })
            .await?;
            match out {
                Output::Json => print_json(&json!(all.iter().map(entry_json).collect::<Vec<_>>())),
                Output::Human => {
                    println!(
                        "Found {} entr{}",
                        all.len(),
                        if all.len() == 1 { "y" } else { "ies" }
                    );
                    for e in &all {
                        println!();
                        print!("{}", entry_human(e));
                    }
                }
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Run the node agent: attest, keep SVIDs fresh, serve the SPIFFE Workload API.
    #[command(
        after_help = "Example:\n  ward agent run --trust-domain example.org --ca-address 127.0.0.1:8081 \\\n    --trust-bundle bundle.pem --socket-path /run/ward/workload.sock\n  (with WARD_JOIN_TOKEN=$TOKEN in its environment: a --join-token is shown to every local user by ps)"
    )]
    Run(Box<super::agent::RunArgs>),
    /// List attested agents.
    #[command(after_help = "Example:\n  ward agent list --output json")]
    List {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Evict an agent: it can no longer renew its node SVID or have SVIDs
    /// signed. An agent not attested yet: its join token is revoked.
    #[command(
        after_help = "Example:\n  ward agent evict spiffe://example.org/ward/agent/join_token/4f2a..."
    )]
    Evict {
        spiffe_id: String,
        #[command(flatten)]
        target: AdminTarget,
    },
}

pub async fn agent(cmd: AgentCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Run(args) => super::agent::run(*args).await?,
        AgentCommand::List { target } => {
            let c = client(&target).await?;
            let agents = all_pages(|page_token| {
                let mut c = c.clone();
                async move {
                    let req = pb::ListAgentsRequest {
                        page_token,
                        page_size: 0,
                    };
                    let r = c.list_agents(req).await?.into_inner();
                    Ok((r.agents, r.next_page_token))
                }
            })
            .await?;
            match out {
                Output::Json => print_json(&json!(agents
                    .iter()
                    .map(|a| json!({
                        "spiffe_id": a.spiffe_id,
                        "attestation_type": a.attestation_type,
                        "serial_number": a.serial_number,
                        "expires_at": a.expires_at,
                        "evicted": a.evicted,
                        "attested_at": a.attested_at,
                    }))
                    .collect::<Vec<_>>())),
                Output::Human => {
                    println!(
                        "Found {} agent{}",
                        agents.len(),
                        if agents.len() == 1 { "" } else { "s" }
                    );
                    for a in &agents {
                        println!(
                            "\nSPIFFE ID:   {}\nAttestation: {}\nSerial:      {}\nExpires:     {}\nEvicted:     {}",
                            a.spiffe_id,
                            a.attestation_type,
                            a.serial_number,
                            output::time(a.expires_at),
                            a.evicted
                        );
                    }
                }
            }
        }
        AgentCommand::Evict { spiffe_id, target } => {
            let mut c = client(&target).await?;
            c.evict_agent(pb::EvictAgentRequest {
                spiffe_id: spiffe_id.clone(),
            })
            .await
            .map_err(status)?;
            match out {
                Output::Json => print_json(&json!({ "evicted": spiffe_id })),
                Output::Human => println!("Evicted {spiffe_id}"),
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle.
    #[command(
        after_help = "Example:\n  ward bundle show > bundle.pem\n  ward bundle show --format jwks"
    )]
    Show {
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Federate with another trust domain: store (or replace) its bundle, so
    /// its workloads are trusted as peers by ours (policies still decide).
    #[command(
        after_help = "Example:\n  ward bundle set --trust-domain partner.example --file partner.pem\n  ward bundle set --trust-domain partner.example --file partner.jwks --format jwks"
    )]
    Set {
        #[arg(long)]
        trust_domain: String,
        /// The other trust domain's bundle (`ward bundle show` there).
        #[arg(long)]
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// Keep the bundle fresh from the other trust domain's SPIFFE bundle
        /// endpoint (https_spiffe), e.g. https://ca.partner.test:8443
        #[arg(long)]
        endpoint_url: Option<String>,
        /// The SPIFFE ID the endpoint must present. Default spiffe://<trust domain>/ward/ca
        #[arg(long, requires = "endpoint_url")]
        endpoint_spiffe_id: Option<String>,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List the trust domains we federate with.
    #[command(after_help = "Example:\n  ward bundle list --output json")]
    List {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Stop federating with a trust domain.
    #[command(
        after_help = "Example:\n  ward bundle delete --trust-domain partner.test --mode dissociate"
    )]
    Delete {
        #[arg(long)]
        trust_domain: String,
        /// What happens to entries that federate with it: restrict (refuse
        /// while there are any), dissociate (remove it from their
        /// federates_with), delete (delete them).
        #[arg(long, value_enum, default_value_t = DeleteMode::Restrict)]
        mode: DeleteMode,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// `ward bundle delete --mode` (as SPIRE's `bundle delete -mode`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DeleteMode {
    Restrict,
    Dissociate,
    Delete,
}

/// A federated bundle as `bundle list` and `bundle set` show it.
fn bundle_row(b: &types::Bundle) -> anyhow::Result<serde_json::Value> {
    let td = ward_spec::TrustDomain::new(&b.trust_domain)?;
    let parsed = TrustBundle::from_jwks(td, &b.jwks)?;
    Ok(json!({
        "trust_domain": b.trust_domain,
        "x509_authorities": parsed.x509_authorities.len(),
        "jwt_authorities": parsed.jwt_authorities.len(),
        "jwt_key_ids": parsed.jwt_authorities.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(),
        "endpoint_url": b.endpoint_url,
        "endpoint_spiffe_id": b.endpoint_spiffe_id,
    }))
}

pub async fn bundle(cmd: BundleCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Show { format, target } => {
            let b = client(&target)
                .await?
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match format {
                // A JWKS document is JSON already.
                BundleFormat::Jwks => println!("{}", String::from_utf8_lossy(&b.jwks)),
                BundleFormat::Pem => {
                    let td = ward_spec::TrustDomain::new(&b.trust_domain)?;
                    let pem = TrustBundle::from_jwks(td, &b.jwks)?.x509_pem();
                    match out {
                        Output::Json => print_json(&json!({
                            "trust_domain": b.trust_domain, "x509_authorities_pem": pem,
                        })),
                        Output::Human => print!("{pem}"),
                    }
                }
            }
        }
        BundleCommand::Set {
            trust_domain,
            file,
            format,
            endpoint_url,
            endpoint_spiffe_id,
            target,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let jwks = match format {
                BundleFormat::Jwks => text.into_bytes(),
                BundleFormat::Pem => {
                    let td = ward_spec::TrustDomain::new(&trust_domain)?;
                    let mut b = TrustBundle::new(td);
                    b.x509_authorities = ward_spec::bundle::pem_to_ders("CERTIFICATE", &text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                    if b.x509_authorities.is_empty() {
                        anyhow::bail!(
                            "{}: no PEM certificate in it (for a JWKS bundle, add --format jwks)",
                            file.display()
                        );
                    }
                    b.to_jwks()
                }
            };
            let b = client(&target)
                .await?
                .set_federated_bundle(types::Bundle {
                    trust_domain,
                    jwks,
                    endpoint_url: endpoint_url.unwrap_or_default(),
                    endpoint_spiffe_id: endpoint_spiffe_id.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => print_json(&bundle_row(&b)?),
                Output::Human => println!("Federating with {}.", b.trust_domain),
            }
        }
        BundleCommand::List { target } => {
            let list = client(&target)
                .await?
                .list_federated_bundles(pb::ListFederatedBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .bundles;
            let rows = list
                .iter()
                .map(bundle_row)
                .collect::<anyhow::Result<Vec<_>>>()?;
            match out {
                Output::Json => print_json(&serde_json::Value::Array(rows)),
                Output::Human if rows.is_empty() => println!("No federated trust domains."),
                Output::Human => {
                    for r in rows {
                        let from = match r["endpoint_url"].as_str() {
                            Some("") | None => "set by hand".to_owned(),
                            Some(url) => format!(
                                "refreshed from {url} ({})",
                                r["endpoint_spiffe_id"].as_str().unwrap_or_default()
                            ),
                        };
                        println!(
                            "{}: {} X.509 root(s), {} JWT key(s), {from}",
                            r["trust_domain"].as_str().unwrap_or_default(),
                            r["x509_authorities"],
                            r["jwt_authorities"]
                        );
                    }
                }
            }
        }
        BundleCommand::Delete {
            trust_domain,
            mode,
            target,
        } => {
            let pb_mode = match mode {
                DeleteMode::Restrict => pb::BundleDeleteMode::Restrict,
                DeleteMode::Dissociate => pb::BundleDeleteMode::Dissociate,
                DeleteMode::Delete => pb::BundleDeleteMode::Delete,
            };
            let r = client(&target)
                .await?
                .delete_federated_bundle(pb::DeleteFederatedBundleRequest {
                    trust_domain: trust_domain.clone(),
                    mode: pb_mode as i32,
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => print_json(&json!({
                    "trust_domain": trust_domain,
                    "mode": format!("{mode:?}").to_lowercase(),
                    "entries": r.entry_ids,
                })),
                Output::Human => {
                    println!("No longer federating with {trust_domain}.");
                    let n = r.entry_ids.len();
                    let what = match mode {
                        DeleteMode::Delete => "Deleted",
                        _ => "Removed it from",
                    };
                    if n > 0 {
                        println!(
                            "{what} {n} entr{}: {}",
                            if n == 1 { "y" } else { "ies" },
                            r.entry_ids.join(", ")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
