//! Generates the tonic/prost code for the node and admin APIs with a vendored
//! `protoc`, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let protos = [
        "proto/ward/types/v1/types.proto",
        "proto/ward/node/v1/node.proto",
        "proto/ward/admin/v1/admin.proto",
        "proto/ward/agent/v1/agent.proto",
        "proto/spiffe/workload.proto",
    ];
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
