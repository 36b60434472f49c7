//! What the agent checks of the host's input: OCI spec, process and
//! resources JSON and the bundle built from them, the field checks of
//! `hull_agent_api::validate`, the STDIO header line and the sandbox plan;
//! see `hull_fuzz::agent::spec`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: hull_fuzz::agent::write_seeds_if_asked(hull_fuzz::agent::spec_seeds), |data: &[u8]| {
    hull_fuzz::agent::spec(data);
});
