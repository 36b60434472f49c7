//! Generates the protobuf messages and the async (tokio) ttrpc client and
//! server for `proto/agent.proto` into OUT_DIR: pure Rust, no protoc binary.
//!
//! The generated files start with inner attributes (`#![allow(...)]`), which
//! `include!` does not accept inside a module; they are stripped here and the
//! equivalent `#[allow]`s sit on the modules in `src/lib.rs`.

use std::path::Path;
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const GENERATED: [&str; 2] = ["agent.rs", "agent_ttrpc.rs"];

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    Codegen::new()
        .out_dir(&out_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize { async_all: true, ..Default::default() })
        .rust_protobuf_customize(ProtobufCustomize::default())
        .run()
        .expect("generating ttrpc code for proto/agent.proto");
    for name in GENERATED {
        let path = Path::new(&out_dir).join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let kept: Vec<&str> =
            text.lines().filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!")).collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
