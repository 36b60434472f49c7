//! The agent's request decoding and handlers: ttrpc requests (any method,
//! any payload) through the generated handlers into the real service, with
//! the container backend mocked, and STDIO connections; see
//! `hull_fuzz::agent::api`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: hull_fuzz::agent::write_seeds_if_asked(hull_fuzz::agent::api_seeds), |data: &[u8]| {
    hull_fuzz::agent::api(data);
});
