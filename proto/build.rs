//! Generates the tonic/prost code for `proto/corral/v1/corral.proto` at build time.
//! Needs `protoc` (Debian: protobuf-compiler), which the README's commands install.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/corral/v1/corral.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small per-RPC buffers: see src/codec.rs.
        .codec_path("crate::codec::LeanCodec")
        .compile_protos(&["proto/corral/v1/corral.proto"], &["proto"])?;
    Ok(())
}
