//! The crate's front page (`src/lib.rs`) tells the README's story: its quick start is the
//! README's, line for line, so that the example a reader meets on docs.rs is the one the README's
//! doc test runs. (The README's code blocks run as doc tests of their own.)

const README: &str = include_str!("../README.md");
const LIB: &str = include_str!("../src/lib.rs");

/// The first ```rust block after the heading `heading`.
fn first_rust_block<'a>(lines: impl Iterator<Item = &'a str>, heading: &str) -> Vec<&'a str> {
    let mut lines = lines.skip_while(|l| l.trim_end() != heading);
    let _ = lines.by_ref().find(|l| l.starts_with("```rust") || *l == "```");
    let block: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    assert!(!block.is_empty(), "no code block after {heading:?}");
    block
}

#[test]
fn the_front_page_has_the_readmes_quick_start() {
    let readme = first_rust_block(README.lines(), "## Quick start");
    let front_page = LIB
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .map(|l| l.strip_prefix("//! ").unwrap_or(l.strip_prefix("//!").unwrap_or(l)));
    let front_page = first_rust_block(front_page, "## Quick start");
    assert_eq!(front_page, readme, "src/lib.rs's quick start differs from the README's");
}
