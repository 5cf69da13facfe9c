//! Compiles the NSM protos with `protox` (pure Rust), so a fresh machine needs
//! no system `protoc`.
//!
//! Upstream compiles each directory with `protoc -I .`, so imports and
//! descriptor file names are bare (`connection.proto`). We keep that by putting
//! every proto directory on the include path and naming files relative to it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let includes = ["proto/networkservice", "proto/registry", "proto/ipam"];
    let files = ["connectioncontext.proto", "connection.proto", "networkservice.proto", "registry.proto", "ipam.proto"];
    for dir in includes {
        println!("cargo:rerun-if-changed={dir}");
    }
    let fds = protox::compile(files, includes)?;
    // Keep the descriptor set: the wire-compatibility tests read field names and
    // numbers from it.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("nsm_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
