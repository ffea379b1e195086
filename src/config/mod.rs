//! The TOML configuration: schema, defaults and validation.
//!
//! The file is read by hand over a spanned TOML tree rather than with `serde` derive, because
//! serde stops at the first problem and canaryd reports **every** problem at
//! once, each with its key path and line. Everything the data path relies on (weights in basis
//! points summing to 10000, a baseline that exists, header names that parse) is checked here, so
//! later stages never re-validate.

use std::path::Path;

use toml::de::DeTable;

mod reader;
mod schema;

pub use self::schema::*;

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text, reporting every problem found.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let doc = DeTable::parse(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                line: e.span().map(|s| reader::line_of(text, s.start)),
                message: format!("invalid TOML: {}", e.message().trim_end()),
            }])
        })?;
        reader::read(text, doc.get_ref())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::reader::parse_status_entry;
    use super::*;

    const MINIMAL: &str = r#"
[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 90

[[upstream]]
name = "canary"
url = "http://127.0.0.1:9001"
weight = 10
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.listen.addr, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.listen.request_timeout, Duration::from_secs(60));
        assert_eq!(c.admin.addr, "127.0.0.1:9901".parse().expect("addr"));
        assert_eq!(c.routing.sticky_header, "x-user-id");
        assert_eq!(
            c.routing.response_header.as_ref().map(|h| h.as_str()),
            Some("x-canaryd-upstream")
        );
        assert_eq!(c.baseline().name, "stable");
        assert_eq!(c.weights_bp(), vec![9000, 1000]);
        assert!(c.rollback.error_statuses.contains(503));
        assert!(!c.rollback.error_statuses.contains(404));
    }

    #[test]
    fn every_problem_is_reported_with_its_path_and_line() {
        let text = r#"
[listen]
adr = "0.0.0.0:8080"
request_timeout = "soon"

[routing]
baseline = "prod"

[[upstream]]
name = "stable"
url = "ftp://x"
weight = 90.001

[[upstream]]
name = "stable"
url = "http://127.0.0.1:9001"
weight = 20
"#;
        let errs = Config::parse(text).expect_err("invalid").0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "listen.adr",
            "listen.request_timeout",
            "upstream[0].url",
            "upstream[0].weight",
            "upstream[1].name",
            "routing.baseline",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        let typo = errs.iter().find(|e| e.path == "listen.adr").expect("typo");
        assert_eq!(typo.line, Some(3));
        assert!(
            typo.message.contains("did you mean `addr`"),
            "{}",
            typo.message
        );
    }

    #[test]
    fn weights_must_sum_to_100() {
        let text = MINIMAL.replace("weight = 10", "weight = 12.5");
        let errs = Config::parse(&text).expect_err("invalid");
        let msg = errs.to_string();
        assert!(msg.contains("sum to 102.5"), "{msg}");
    }

    #[test]
    fn fractional_weights_become_basis_points() {
        let text = MINIMAL
            .replace("weight = 90", "weight = 87.5")
            .replace("weight = 10", "weight = 12.5");
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.weights_bp(), vec![8750, 1250]);
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let errs = Config::parse("[listen]\naddr = \n").expect_err("invalid").0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, Some(2));
    }

    #[test]
    fn status_entries() {
        assert_eq!(parse_status_entry("5xx"), Some((500, 599)));
        assert_eq!(parse_status_entry("4XX"), Some((400, 499)));
        assert_eq!(parse_status_entry("429"), Some((429, 429)));
        assert_eq!(parse_status_entry("6xx"), None);
        assert_eq!(parse_status_entry("99"), None);
    }

    #[test]
    fn missing_upstreams_is_an_error() {
        let errs = Config::parse("[listen]\naddr = \"127.0.0.1:0\"\n").expect_err("invalid");
        assert!(errs.to_string().contains("at least one [[upstream]]"));
    }
}
