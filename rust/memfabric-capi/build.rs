//! Present so that the build dependency in Cargo.toml (a feature alignment, see there) counts.
fn main() {}
