//! The CRD YAML under crds/ is what the Rust types generate (`redline-operator crd`), and the
//! chart ships the same files: regenerate with `cargo run -p redline-operator -- crd-files`.

use redline_testcluster::testing::repo;

#[test]
fn checked_in_crds_match_the_rust_types() {
    for (file, yaml) in redline_operator::crd_yaml() {
        for dir in ["crds", "charts/redline/crds"] {
            let path = repo().join(dir).join(file);
            let on_disk = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                on_disk == yaml,
                "{} is stale: regenerate with `cargo run -p redline-operator -- crd-files`",
                path.display()
            );
        }
    }
}
