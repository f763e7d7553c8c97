//! Compiles `proto/controlplane.proto` with protox (pure Rust; no system `protoc`) when the
//! gRPC API is enabled (the `client` feature).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/controlplane.proto");
    if std::env::var_os("CARGO_FEATURE_CLIENT").is_none() {
        return Ok(());
    }
    let fds = protox::compile(["proto/controlplane.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set serves gRPC reflection.
    std::fs::write(
        out.join("controlplane_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
