//! SECURITY.md names, for each claim, the test that shows it. This keeps
//! the names honest: each `path::name` reference must be a test function
//! (`#[test]` or `#[tokio::test]`) in that file.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

use std::path::Path;

#[test]
fn every_test_named_in_security_md_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("SECURITY.md")).unwrap();
    let mut checked = 0;
    // Code spans are the odd pieces between backticks.
    for span in text.split('`').skip(1).step_by(2) {
        let Some((file, name)) = span.split_once("::") else {
            continue;
        };
        assert!(
            file.ends_with(".rs") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "not a file::test reference: `{span}`"
        );
        let source = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("SECURITY.md names {file}: {e}"));
        let at = source
            .find(&format!("fn {name}("))
            .unwrap_or_else(|| panic!("SECURITY.md names {file}::{name}, which does not exist"));
        let before = &source[..at];
        let attr = before.rfind("#[").unwrap_or(0);
        assert!(
            before[attr..].starts_with("#[test]") || before[attr..].starts_with("#[tokio::test"),
            "{file}::{name} is not a test"
        );
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} references found");
}
