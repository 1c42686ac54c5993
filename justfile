# The developer's recipes; CI (.ci/run) runs the same commands.

# Run the whole test suite (installs the test tools it needs when missing; see scripts/test).
test *args:
    scripts/test {{args}}

# One build of what the demo and the client run (as scripts/test builds it); `cargo run
# --example client` reuses it.
build:
    cargo build --workspace --bins --examples

# The demo: the router, two echo-plugin instances and the file lister (deploy/local.toml).
demo: build
    target/debug/mesh up --config deploy/local.toml

# Call the running demo by name with the example client.
client *args: build
    cargo run --example client -- {{args}}

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Everything CI runs.
ci:
    .ci/run

# The benchmark of issue 5: writes docs/performance.{md,json} (--quick: smoke run; --help: knobs).
bench *args:
    cargo build --release --workspace
    target/release/mesh-bench {{args}}
