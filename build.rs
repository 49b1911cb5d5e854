//! Generates the gRPC code and the descriptor set served by reflection.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    // sqlx::migrate! embeds the migrations: a new file must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    let protoc = match env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let include = protoc_bin_vendored::include_path()?;
    let include = include.to_str().ok_or("non-UTF-8 protoc include path")?.to_owned();
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // SAFETY: build scripts are single-threaded; prost-build reads `PROTOC` from the
    // environment, so this makes a fresh machine build without a system protoc.
    unsafe { env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("lockstep_descriptor.bin"))
        .compile_protos(&["proto/lockstep/v1/lockstep.proto".to_owned()], &["proto".to_owned(), include])?;
    Ok(())
}
