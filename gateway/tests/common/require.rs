//! Tools a test needs from the host (PostgreSQL, curl, openssl, network
//! namespaces): where one is missing the test says so
//! and skips, unless `GATEWAY_REQUIRE` names it (a comma-separated list of
//! tools, or `all`, as `.ci/run` sets it after installing every one); then
//! the skip is a failure.

/// The variable that turns a skip into a failure.
pub const VARIABLE: &str = "GATEWAY_REQUIRE";

/// Whether `GATEWAY_REQUIRE` asks for `tool`.
pub fn required(tool: &str) -> bool {
    std::env::var(VARIABLE).is_ok_and(|list| {
        list.split(',')
            .map(str::trim)
            .any(|wanted| wanted == "all" || wanted == tool)
    })
}

/// Says that the test is skipped because `tool` is unusable, and `why`;
/// panics instead when the run requires `tool`. Call it where the test
/// then returns.
pub fn skip_for_want_of(tool: &str, why: &str) {
    if required(tool) {
        panic!("{why}, and {VARIABLE} requires {tool}");
    }
    eprintln!("SKIPPED: {why} (set {VARIABLE}={tool} to fail instead)");
}

/// `true` when `tool` answers `tool ARGS` (say, `--version`); otherwise
/// says why the test is skipped (or fails, see [`skip_for_want_of`]) and
/// `false`.
pub fn tool_or_skip(tool: &str, args: &[&str], what: &str) -> bool {
    let answers = std::process::Command::new(tool)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !answers {
        skip_for_want_of(tool, &format!("{what}: {tool} is not installed"));
    }
    answers
}
