//! `ward svid …`: Workload API clients for operators and scripts.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use ward_spec::bundle::der_to_pem;
use ward_spec::proto::workload as pb;
use ward_spec::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

use super::output::{print_json, time};
use super::Output;

#[derive(clap::Args, Clone)]
pub struct WorkloadTarget {
    /// The Workload API socket (unix:///path or a path).
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix://.ward/agent/workload.sock"
    )]
    socket: String,
}

#[derive(Subcommand)]
pub enum SvidCommand {
    /// Fetch this process's X509-SVIDs (and optionally write them to files).
    #[command(
        after_help = "Example:\n  ward svid fetch --socket unix:///run/ward/workload.sock --write /tmp/svid\n  (writes svid.pem, svid.key and bundle.pem)"
    )]
    Fetch {
        #[command(flatten)]
        target: WorkloadTarget,
        /// Directory to write svid.pem, svid.key (0600) and bundle.pem into.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch a JWT-SVID for an audience.
    #[command(after_help = "Example:\n  ward svid jwt --audience db")]
    Jwt {
        #[command(flatten)]
        target: WorkloadTarget,
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID (when the caller has several).
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Validate a JWT-SVID for an audience.
    #[command(after_help = "Example:\n  ward svid validate --audience db - < token")]
    Validate {
        #[command(flatten)]
        target: WorkloadTarget,
        #[arg(long)]
        audience: String,
        /// The token, or `-` to read it from standard input (a token on the
        /// command line is seen by every local user, in `ps`).
        token: String,
    },
}

type Client = SpiffeWorkloadApiClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn add_header(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(req)
}

async fn client(target: &WorkloadTarget) -> anyhow::Result<Client> {
    let path = ward_spec::grpc::socket_path(&target.socket).map_err(anyhow::Error::msg)?;
    let ch = ward_spec::grpc::unix_channel(path.clone())
        .await
        .with_context(|| format!("cannot reach the Workload API at {} (is `ward agent run` running? set SPIFFE_ENDPOINT_SOCKET or --socket)", path.display()))?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        ch,
        add_header as fn(_) -> _,
    ))
}

/// The first X509-SVID the Workload API at `socket` gives this process.
pub async fn fetch_first(socket: &str) -> anyhow::Result<pb::X509svid> {
    let resp = fetch_x509(&WorkloadTarget {
        socket: socket.to_owned(),
    })
    .await?;
    resp.svids
        .into_iter()
        .next()
        .context("the Workload API gave this process no SVID")
}

/// The first message of the X509-SVID stream: what this process gets now.
async fn fetch_x509(target: &WorkloadTarget) -> anyhow::Result<pb::X509svidResponse> {
    let mut c = client(target).await?;
    let mut stream = c
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .map_err(status)?
        .into_inner();
    stream
        .message()
        .await
        .map_err(status)?
        .context("the Workload API closed the stream without an answer")
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

pub async fn run(cmd: SvidCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        SvidCommand::Fetch { target, write } => {
            let resp = fetch_x509(&target).await?;
            let mut shown = Vec::new();
            for (i, s) in resp.svids.iter().enumerate() {
                let chain = ward_spec::svid::split_der_chain(&s.x509_svid)?;
                let leaf = chain.first().with_context(|| {
                    format!("SVID {:?} came without a certificate", s.spiffe_id)
                })?;
                let (_, not_after) = ward_spec::svid::validity(leaf)?;
                if let Some(dir) = &write {
                    let suffix = if i == 0 {
                        String::new()
                    } else {
                        format!(".{i}")
                    };
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    let write = |name: String, data: &[u8], secret: bool| {
                        let path = dir.join(name);
                        ward_spec::files::write_atomic(&path, data, secret)
                            .with_context(|| format!("cannot write {}", path.display()))
                    };
                    let pem: String = chain.iter().map(|d| der_to_pem("CERTIFICATE", d)).collect();
                    write(format!("svid{suffix}.pem"), pem.as_bytes(), false)?;
                    let key = der_to_pem("PRIVATE KEY", &s.x509_svid_key);
                    write(format!("svid{suffix}.key"), key.as_bytes(), true)?;
                    let roots = ward_spec::svid::split_der_chain(&s.bundle)?;
                    let pem: String = roots.iter().map(|d| der_to_pem("CERTIFICATE", d)).collect();
                    write(format!("bundle{suffix}.pem"), pem.as_bytes(), false)?;
                }
                shown.push((s.spiffe_id.clone(), not_after, s.hint.clone()));
            }
            match out {
                Output::Json => print_json(&json!(shown
                    .iter()
                    .map(
                        |(id, exp, hint)| json!({"spiffe_id": id, "expires_at": exp, "hint": hint})
                    )
                    .collect::<Vec<_>>())),
                Output::Human => {
                    for (id, exp, hint) in &shown {
                        println!("SPIFFE ID: {id}\nExpires:   {}", time(*exp));
                        if !hint.is_empty() {
                            println!("Hint:      {hint}");
                        }
                    }
                    if let Some(dir) = &write {
                        println!(
                            "Wrote svid.pem, svid.key and bundle.pem to {}",
                            dir.display()
                        );
                    }
                }
            }
        }
        SvidCommand::Jwt {
            target,
            audience,
            spiffe_id,
        } => {
            let mut c = client(&target).await?;
            let resp = c
                .fetch_jwtsvid(pb::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if resp.svids.is_empty() {
                bail!("the Workload API returned no JWT-SVID");
            }
            match out {
                Output::Json => print_json(&json!(resp
                    .svids
                    .iter()
                    .map(|s| json!({"spiffe_id": s.spiffe_id, "token": s.svid, "hint": s.hint}))
                    .collect::<Vec<_>>())),
                Output::Human => {
                    for s in &resp.svids {
                        println!("{}", s.svid);
                    }
                }
            }
        }
        SvidCommand::Validate {
            target,
            audience,
            token,
        } => {
            let token = if token == "-" {
                let mut read = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut read)
                    .context("cannot read the token from standard input")?;
                read.trim().to_owned()
            } else {
                token
            };
            if token.is_empty() {
                bail!("no token given (standard input was empty)");
            }
            let mut c = client(&target).await?;
            let resp = c
                .validate_jwtsvid(pb::ValidateJwtsvidRequest {
                    audience,
                    svid: token,
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => print_json(&json!({"spiffe_id": resp.spiffe_id, "valid": true})),
                Output::Human => println!("Valid JWT-SVID for {}", resp.spiffe_id),
            }
        }
    }
    Ok(())
}
