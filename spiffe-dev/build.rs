//! Compiles `proto/workload.proto` (the SPIFFE Workload API) with `protox`
//! (pure Rust), so no system `protoc` is needed. The file has no `package`
//! statement, as upstream's, so the gRPC paths are `/SpiffeWorkloadAPI/...`
//! and prost writes `OUT_DIR/_.rs`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["workload.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
